"""Load compiled bundles and launch them through cuda-python.  Needs no CuTe DSL.

    from mlagen import runtime
    k = runtime.load("build/qk_rmsnorm_bf16_bf16_q1536_k512_t64_r2_ieee.sm_90a")
    outs = k(q=q, k=kk, gamma_q=gq, gamma_k=gk, qk_var=var, eps=1e-6)      # torch tensors in, out
    k(q=q, ..., q_out=qo, k_out=ko, stream=torch.cuda.current_stream())    # caller's buffers and stream

Arrays may be torch tensors, any object with ``__cuda_array_interface__`` (CuPy, Numba) or ``__dlpack__``.
Every argument is checked against the bundle's manifest (dtype, rank, static extents, strides,
alignment, symbol consistency and ranges, and the family's own checks such as page indices) before
anything is launched; a failure raises :class:`mlagen.abi.ArgumentError` naming the argument.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import families
from .abi import DTYPES, ArgLayout, ArgumentError, ScalarArg, TensorArg, TensorMapArg

MANIFEST = "manifest.json"


class LaunchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------
@dataclass
class DeviceArray:
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]      # in elements
    dtype: str                    # mlagen dtype name
    device: int
    owner: Any = None             # the object the view came from (kept alive)


_TORCH_DTYPES = {v.torch: k for k, v in DTYPES.items()}
_TYPESTR = {v.typestr: k for k, v in DTYPES.items() if v.typestr}


def as_device_array(x: Any, name: str = "array") -> DeviceArray:
    if isinstance(x, DeviceArray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        if not x.is_cuda:
            raise ArgumentError(f"argument '{name}': torch tensor is on {x.device}, not a CUDA device")
        dt = _TORCH_DTYPES.get(str(x.dtype).replace("torch.", ""))
        if dt is None:
            raise ArgumentError(f"argument '{name}': torch dtype {x.dtype} is not supported")
        return DeviceArray(x.data_ptr(), tuple(x.shape), tuple(x.stride()), dt, x.device.index, x)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        dt = _TYPESTR.get(cai["typestr"])
        if dt is None:
            raise ArgumentError(f"argument '{name}': typestr {cai['typestr']} is not supported")
        isz = DTYPES[dt].itemsize
        shape = tuple(cai["shape"])
        if cai.get("strides") is None:
            st, acc = [], 1
            for d in reversed(shape):
                st.append(acc)
                acc *= d
            strides = tuple(reversed(st))
        else:
            if any(s % isz for s in cai["strides"]):
                raise ArgumentError(f"argument '{name}': byte strides {cai['strides']} are not multiples of {isz}")
            strides = tuple(s // isz for s in cai["strides"])
        dev = _device_of_pointer(cai["data"][0])
        return DeviceArray(int(cai["data"][0]), shape, strides, dt, dev, x)
    if hasattr(x, "__dlpack__"):
        try:
            import torch
        except ImportError:
            raise ArgumentError(f"argument '{name}': DLPack arrays need torch installed to be viewed") from None
        return as_device_array(torch.from_dlpack(x), name)
    raise ArgumentError(f"argument '{name}': {type(x).__name__} is not a CUDA array "
                        "(torch tensor, __cuda_array_interface__ or __dlpack__)")


def _device_of_pointer(ptr: int) -> int:
    drv = _driver()
    err, ordinal = drv.cuPointerGetAttribute(drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr)
    _check(err, "cuPointerGetAttribute")
    return int(ordinal)


# --------------------------------------------------------------------------------------------
# Driver plumbing
# --------------------------------------------------------------------------------------------
_DRV = None
_LOCK = threading.Lock()
_CTX: dict[int, Any] = {}


def _driver():
    global _DRV
    if _DRV is None:
        from cuda.bindings import driver
        _check(driver.cuInit(0)[0], "cuInit", driver)
        _DRV = driver
    return _DRV


def _check(err, what: str, drv=None) -> None:
    drv = drv or _DRV
    if int(err) != 0:
        try:
            _, s = drv.cuGetErrorString(err)
            s = s.decode() if isinstance(s, bytes) else str(s)
        except Exception:
            s = ""
        raise LaunchError(f"{what} failed: {err!r} {s}")


def _use_device(ordinal: int) -> None:
    """Make the device's primary context current (the one torch and CuPy use)."""
    drv = _driver()
    err, cur = drv.cuCtxGetCurrent()
    if int(err) == 0 and int(cur) != 0:
        err, dev = drv.cuCtxGetDevice()
        if int(err) == 0 and int(dev) == ordinal:
            return
    with _LOCK:
        if ordinal not in _CTX:
            err, dev = drv.cuDeviceGet(ordinal)
            _check(err, "cuDeviceGet")
            err, ctx = drv.cuDevicePrimaryCtxRetain(dev)
            _check(err, "cuDevicePrimaryCtxRetain")
            _CTX[ordinal] = ctx
    _check(drv.cuCtxSetCurrent(_CTX[ordinal])[0], "cuCtxSetCurrent")


_ATTRS: dict[tuple[int, str], int] = {}


def _device_attr(device: int, name: str) -> int:
    """``CU_DEVICE_ATTRIBUTE_<name>`` of CUDA device ``device`` (cached)."""
    if (device, name) not in _ATTRS:
        drv = _driver()
        _use_device(device)
        err, dev = drv.cuDeviceGet(device)
        _check(err, "cuDeviceGet")
        err, n = drv.cuDeviceGetAttribute(getattr(drv.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}"), dev)
        _check(err, f"cuDeviceGetAttribute({name})")
        _ATTRS[(device, name)] = int(n)
    return _ATTRS[(device, name)]


def sm_count(device: int = 0) -> int:
    """Streaming multiprocessors of CUDA device ``device`` (cached)."""
    return _device_attr(device, "MULTIPROCESSOR_COUNT")


def device_arch(device: int = 0) -> str:
    """The cubin architecture CUDA device ``device`` runs: ``sm_{major}{minor}a``."""
    return (f"sm_{_device_attr(device, 'COMPUTE_CAPABILITY_MAJOR')}"
            f"{_device_attr(device, 'COMPUTE_CAPABILITY_MINOR')}a")


def device_sms(device: int) -> int:
    """sm_count, or an H100's 132 where no driver answers (a host without a GPU choosing or sizing)."""
    try:
        return sm_count(device)
    except Exception:
        return 132


def stream_handle(stream: Any, device: int, torch_inputs: bool) -> int:
    """The CUstream handle for ``stream``: None means torch's current stream (or the legacy default)."""
    if stream is None:
        if torch_inputs:
            import torch
            return int(torch.cuda.current_stream(device).cuda_stream)
        return 0
    if isinstance(stream, int):
        return stream
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    if hasattr(stream, "cuda_stream"):       # torch.cuda.Stream
        return int(stream.cuda_stream)
    if hasattr(stream, "ptr"):               # cupy.cuda.Stream
        return int(stream.ptr)
    try:
        return int(stream)                   # cuda.bindings CUstream
    except TypeError:
        raise ArgumentError(f"stream: cannot use {type(stream).__name__} as a CUDA stream") from None


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
class Kernel:
    """One compiled bundle, loaded lazily per device."""

    def __init__(self, bundle_dir: str | os.PathLike):
        self.dir = Path(bundle_dir)
        mpath = self.dir / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{self.dir}: no {MANIFEST}; build it with `mlagen generate`")
        self.manifest = json.loads(mpath.read_text())
        self.name = self.manifest["kernel_name"]
        self.family = families.get(self.manifest["family"])
        # parameters added after a bundle was built take their defaults (which keep the old behaviour)
        self.params = {**{q.name: q.default for q in self.family.params}, **self.manifest["params"]}
        self.arch = self.manifest["arch"]
        self.layout = ArgLayout.from_json(self.manifest["layout"])
        if self.layout.param_sizes() != self.manifest["param_sizes"]:
            raise LaunchError(f"{self.name}: manifest layout and PTX parameter sizes disagree")
        self.block = tuple(self.manifest["block"])
        self.cluster = tuple(self.manifest.get("cluster", (1, 1, 1)))   # bundles from before clusters: none
        self.smem = int(self.manifest["smem_bytes"])
        self._fn: dict[int, Any] = {}
        self._mod: dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"Kernel({self.name}, {self.arch})"

    def function(self, device: int):
        if device not in self._fn:
            drv = _driver()
            _use_device(device)
            data = (self.dir / self.manifest["cubin"]).read_bytes()
            err, mod = drv.cuModuleLoadData(data)
            if int(err) != 0:
                _check(err, f"cuModuleLoadData({self.name}, {self.arch}) on device {device}")
            err, fn = drv.cuModuleGetFunction(mod, self.manifest["kernel_symbol"].encode())
            _check(err, f"cuModuleGetFunction({self.manifest['kernel_symbol']})")
            if self.smem > 48 * 1024:
                attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                _check(drv.cuFuncSetAttribute(fn, attr, self.smem)[0], "cuFuncSetAttribute")
            carveout = self.manifest.get("smem_carveout")
            if carveout is not None:   # percent of the unified L1/shared memory to give shared memory
                attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
                _check(drv.cuFuncSetAttribute(fn, attr, int(carveout))[0], "cuFuncSetAttribute(carveout)")
            self._mod[device], self._fn[device] = mod, fn
        return self._fn[device]

    # ---- argument handling ----
    def prepare(self, kwargs: Mapping[str, Any], check_contents: bool = True, allocate: bool = True):
        """Views of all arrays (allocating missing outputs), symbol values and grid.  No launch.

        ``allocate=False`` only decides whether the call fits (what Dispatcher.select needs): missing
        outputs are sized but not allocated, and are absent from the returned views."""
        unknown = set(kwargs) - {a.name for a in self.layout.args}
        if unknown:
            raise ArgumentError(f"{self.name}: unknown argument(s) {sorted(unknown)}; "
                                f"expected {[a.name for a in self.layout.args]}")
        views: dict[str, Any] = {}
        missing_out = []
        for a in self.layout.args:
            if isinstance(a, TensorArg):
                if kwargs.get(a.name) is None:
                    if a.io in ("out", "scratch"):
                        missing_out.append(a)
                        continue
                    raise ArgumentError(f"{self.name}: missing input '{a.name}'")
                views[a.name] = as_device_array(kwargs[a.name], a.name)
            elif isinstance(a, ScalarArg):
                if a.name not in kwargs:
                    default = self.family.scalar_default(self.params, a.name)
                    if default is None:
                        raise ArgumentError(f"{self.name}: missing scalar '{a.name}'")
                    views[a.name] = default
                else:
                    views[a.name] = kwargs[a.name]
        if missing_out:
            sub = ArgLayout(self.layout.symbols, [a for a in self.layout.args if a.name in views])
            dims = sub.resolve(views, self.name)
            dims = {**self.family.derive_dims(self.params, dims), **dims}   # e.g. K / group
            first = next(v for v in views.values() if isinstance(v, DeviceArray))
            for a in missing_out:
                shape = []
                for d in a.shape:
                    if isinstance(d, str) and d not in dims:
                        raise ArgumentError(f"{self.name}: pass output '{a.name}' (its extent {d} is not "
                                            "fixed by the inputs)")
                    shape.append(dims[d] if isinstance(d, str) else d)
                if allocate:
                    views[a.name] = as_device_array(_alloc_like(first, tuple(shape), a.dtype, zero=a.io == "scratch"),
                                                    a.name)
        if allocate or not missing_out:
            dims = self.layout.resolve(views, self.name)
        devs = {v.device for v in views.values() if isinstance(v, DeviceArray)}
        if len(devs) != 1:
            raise ArgumentError(f"{self.name}: arrays are on several devices {sorted(devs)}")
        self.family.check_call(self.params, views, dims, contents=check_contents)
        device = devs.pop()
        grid = tuple(int(g) for g in self.family.grid(self.params, {**dims, "SMS": device_sms(device)}))
        return views, dims, grid, device

    def __call__(self, stream: Any = None, check_contents: bool = True, **kwargs):
        """Check, allocate missing outputs, launch; return the output arrays by name.

        ``check_contents`` also reads index arrays (row offsets, page table, lengths) back to the host
        to report bad page indices or cache overflow before launching; it synchronises, so pass False
        on hot paths and under CUDA-graph capture (or bind once and call ``.launch()``).
        """
        b = self.bind(stream=stream, check_contents=check_contents, **kwargs)
        b.launch()
        return b.outputs()

    def bind(self, stream: Any = None, check_contents: bool = True, **kwargs) -> "BoundLaunch":
        """Check the arguments and pack them once; the result launches with no per-call host work."""
        views, dims, grid, device = self.prepare(kwargs, check_contents)
        return BoundLaunch(self, views, dims, grid, device, stream)


class BoundLaunch:
    """A kernel with its arguments checked and packed: ``launch()`` is one cuLaunchKernel.

    The arrays must stay alive and keep their addresses (it holds references to them); the stream
    is fixed at bind time.  This is what a serving loop or a CUDA-graph capture replays.
    """

    def __init__(self, kernel: Kernel, views, dims, grid, device, stream=None):
        drv = _driver()
        self.kernel, self.views, self.dims, self.grid, self.device = kernel, views, dims, grid, device
        self.fn = kernel.function(device)
        torch_inputs = any(isinstance(v, DeviceArray) and type(v.owner).__module__.startswith("torch")
                           for v in views.values())
        self.stream = drv.CUstream(stream_handle(stream, device, torch_inputs))
        tmaps = {a.name: encode_tensor_map(views[a.of], a, kernel.name, views)
                 for a in kernel.layout.params() if isinstance(a, TensorMapArg)}
        self.params, self._keep = kernel.layout.pack(views, tmaps)
        self.empty = grid[0] * grid[1] * grid[2] == 0
        if kernel.cluster == (1, 1, 1):
            self._launch = drv.cuLaunchKernel
            self._args = (self.fn, grid[0], grid[1], grid[2], *kernel.block, kernel.smem, self.stream, self.params, 0)
        else:
            if any(g % c for g, c in zip(grid, kernel.cluster)):
                raise LaunchError(f"{kernel.name}: grid {grid} is not a multiple of its cluster {kernel.cluster}")
            self._launch = drv.cuLaunchKernelEx
            self._args = (_launch_config(grid, kernel.block, kernel.smem, self.stream, kernel.cluster), self.fn,
                          self.params, 0)

    def launch(self) -> None:
        if self.empty:
            return
        err, = self._launch(*self._args)
        if int(err) != 0:
            _check(err, f"cuLaunchKernel({self.kernel.name}, grid={self.grid}, block={self.kernel.block})")

    def outputs(self) -> dict:
        return {a.name: self.views[a.name].owner for a in self.kernel.layout.tensors() if a.io in ("out", "inout")}


def _launch_config(grid, block, smem, stream, cluster):
    """A CUlaunchConfig with the cluster-dimension attribute (what cuLaunchKernelEx takes)."""
    drv = _driver()
    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = (int(g) for g in grid)
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = (int(b) for b in block)
    cfg.sharedMemBytes = int(smem)
    cfg.hStream = stream
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    val = drv.CUlaunchAttributeValue()
    val.clusterDim.x, val.clusterDim.y, val.clusterDim.z = (int(c) for c in cluster)
    attr.value = val
    cfg.numAttrs = 1
    cfg.attrs = [attr]
    return cfg


_TMA_DTYPE = {"f8e4m3": "UINT8", "u8": "UINT8", "bf16": "BFLOAT16", "f16": "FLOAT16", "f32": "FLOAT32",
              "i32": "INT32", "u32": "UINT32", "i64": "INT64"}


def encode_tensor_map(view: DeviceArray, arg: TensorMapArg, kernel: str = "kernel",
                      values: Mapping[str, Any] | None = None) -> bytes:
    """cuTensorMapEncodeTiled for ``view`` as ``arg`` declares it; returns the 128 descriptor bytes.
    ``values`` holds the scalar arguments that ``arg.fixed`` slices the tensor at."""
    drv = _driver()
    isz = DTYPES[view.dtype].itemsize
    ptr = view.ptr
    kept = list(range(len(view.shape)))
    for m, scalar in arg.fixed:
        i = int((values or {})[scalar])
        if not 0 <= i < int(view.shape[m]):
            raise ArgumentError(f"{kernel}: {scalar}={i} is outside '{arg.of}' mode {m} (extent {view.shape[m]})")
        ptr += i * int(view.strides[m]) * isz
        kept.remove(m)
    if arg.fixed:      # the slice: same element type, the remaining modes
        view = DeviceArray(ptr, tuple(view.shape[m] for m in kept), tuple(view.strides[m] for m in kept),
                           view.dtype, view.device, view.owner)
    rank = len(view.shape)
    modes = list(arg.modes) or list(range(rank - 1, -1, -1))
    inner = modes[0]
    if view.strides[inner] != 1 and view.shape[inner] != 1:
        raise ArgumentError(f"{kernel}: '{arg.of}' mode {inner} must have stride 1 for TMA (strides {view.strides})")
    if view.ptr % 16:
        raise ArgumentError(f"{kernel}: '{arg.of}' must be 16-byte aligned for TMA")
    dims = [int(view.shape[m]) for m in modes]
    gstrides = [int(view.strides[m]) * isz for m in modes[1:]]
    if any(g % 16 for g in gstrides):
        raise ArgumentError(f"{kernel}: '{arg.of}' strides {view.strides} must be multiples of 16 bytes for TMA")
    if len(arg.box) != rank:
        raise ArgumentError(f"{kernel}: tensor map '{arg.name}' has a {len(arg.box)}-d box for a rank-{rank} tensor")
    E = drv
    dt = getattr(E.CUtensorMapDataType, f"CU_TENSOR_MAP_DATA_TYPE_{_TMA_DTYPE[view.dtype]}")
    sw = {0: "NONE", 32: "32B", 64: "64B", 128: "128B"}[arg.swizzle]
    l2 = {0: "NONE", 64: "L2_64B", 128: "L2_128B", 256: "L2_256B"}[arg.l2_promotion]
    err, tmap = drv.cuTensorMapEncodeTiled(
        dt, rank, view.ptr,
        [E.cuuint64_t(d) for d in dims],
        [E.cuuint64_t(g) for g in gstrides],
        [E.cuuint32_t(int(b)) for b in arg.box],
        [E.cuuint32_t(1)] * rank,
        E.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        getattr(E.CUtensorMapSwizzle, f"CU_TENSOR_MAP_SWIZZLE_{sw}"),
        getattr(E.CUtensorMapL2promotion, f"CU_TENSOR_MAP_L2_PROMOTION_{l2}"),
        E.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    _check(err, f"cuTensorMapEncodeTiled({kernel}: {arg.name} of '{arg.of}', shape {view.shape}, box {arg.box})")
    import struct
    return struct.pack("<16Q", *[int(x) for x in tmap.opaque])


def _alloc_like(ref: DeviceArray, shape: tuple, dtype: str, zero: bool = False):
    owner = ref.owner
    mod = type(owner).__module__
    if mod.startswith("torch"):
        import torch
        f = torch.zeros if zero else torch.empty
        return f(shape, dtype=getattr(torch, DTYPES[dtype].torch), device=owner.device)
    if mod.startswith("cupy"):
        import cupy
        return (cupy.zeros if zero else cupy.empty)(shape, dtype=DTYPES[dtype].typestr)
    raise ArgumentError(f"cannot allocate an output like a {type(owner).__name__}; pass the output arrays")


def load(bundle_dir: str | os.PathLike) -> Kernel:
    return Kernel(bundle_dir)


def find_bundles(root: str | os.PathLike, family: str | None = None, arch: str | None = None) -> list[Path]:
    """Bundle folders below ``root`` (optionally of one family / arch), sorted by name."""
    out = []
    for m in sorted(Path(root).rglob(MANIFEST)):
        try:
            d = json.loads(m.read_text())
        except ValueError:
            continue
        if (family is None or d.get("family") == family) and (arch is None or d.get("arch") == arch):
            out.append(m.parent)
    return out


class Dispatcher:
    """Pick, per call, the kernel of one family to launch.

    Candidates are the kernels whose layout accepts the call (dtypes, static sizes, alignment...).  The
    tuned table (``mlagen export``: family -> device -> shape bucket -> kernel name) names the measured
    best for the call's bucket (``family.bucket(dims)``: dynamic sizes rounded up to powers of two); for
    a bucket the table lacks, the family's ``prefer`` heuristic chooses.  Choices are cached per call
    signature.
    """

    def __init__(self, kernels: Iterable[Kernel], table: Mapping | None = None, device_name: str | None = None):
        self.kernels = list(kernels)
        if not self.kernels:
            raise ValueError("Dispatcher needs at least one kernel")
        self.family = self.kernels[0].family
        fam_table = dict((table or {}).get(self.family.name, {}))
        self._device_name = device_name
        self._tables = fam_table
        self._cache: dict[Any, Kernel] = {}
        self.last_reason = ""

    def restrict(self, keep) -> "Dispatcher | None":
        """The same dispatcher (table, device) over the candidates ``keep(kernel)`` accepts; None if none."""
        ks = [k for k in self.kernels if keep(k)]
        if not ks:
            return None
        d = Dispatcher(ks, None, self._device_name)
        d._tables = self._tables
        return d

    @classmethod
    def from_dir(cls, root, family: str, arch: str | None = None, table_path: str | None = None):
        ks = [Kernel(b) for b in find_bundles(root, family, arch)]
        table = json.loads(Path(table_path).read_text()) if table_path else None
        return cls(ks, table)

    def _table_for_device(self, device: int) -> Mapping:
        name = self._device_name
        if name is None:
            drv = _driver()
            err, dev = drv.cuDeviceGet(device)
            _check(err, "cuDeviceGet")
            err, raw = drv.cuDeviceGetName(256, dev)
            _check(err, "cuDeviceGetName")
            name = raw.split(b"\0", 1)[0].decode()
        if name in self._tables:
            return self._tables[name]
        return next(iter(self._tables.values()), {})   # another device's table beats none

    def select(self, kwargs: Mapping[str, Any], hint: Mapping[str, int] | None = None) -> Kernel:
        """The kernel for the call ``kwargs``.  ``hint`` adds sizes the arguments do not show (mla_decode's
        context length C) to the dims the table bucket and the heuristic see."""
        sig = tuple(sorted((n, tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", type(v).__name__)),
                            tuple(v.stride()) if hasattr(v, "stride") and callable(v.stride) else None)
                           for n, v in kwargs.items() if not isinstance(v, (int, float))))
        sig += tuple(sorted((hint or {}).items()))
        if sig in self._cache:
            return self._cache[sig]
        errors, ok, dims, device = [], [], None, 0
        for k in self.kernels:
            try:
                _, d, _, device = k.prepare(kwargs, check_contents=False, allocate=False)
                ok.append(k)
                dims = d
            except ArgumentError as e:
                errors.append(f"{k.name}: {e}")
        if not ok:
            raise ArgumentError("no kernel accepts this call:\n  " + "\n  ".join(errors))
        try:
            arch = device_arch(device)   # arch-specific cubins (sm_90a, sm_100a) run on that architecture only
        except Exception:
            arch = None                  # no driver answers: a host without a GPU, choosing for a table or a test
        runs = [k for k in ok if arch is None or k.arch == arch]
        if not runs:
            raise ArgumentError(f"no kernel for this GPU ({arch}) accepts this call: the candidates are built for "
                                f"{sorted({k.arch for k in ok})}")
        ok = runs
        dims = {**dims, **(hint or {})}
        bucket = self.family.table_key(ok[0].params, dims)
        entry = self._table_for_device(device).get(bucket) if self._tables else None
        chosen = next((k for k in ok if entry and k.name == entry.get("kernel")), None)
        if chosen is not None:
            self.last_reason = f"tuned table entry for {bucket}"
        else:
            chosen = self.family.prefer(ok, {**dims, "SMS": device_sms(device)})
            self.last_reason = f"heuristic ({'no table entry for ' + bucket if self._tables else 'no table'})"
        self._cache[sig] = chosen
        return chosen

    def __call__(self, stream=None, check_contents: bool = True, **kwargs):
        return self.select(kwargs)(stream=stream, check_contents=check_contents, **kwargs)
