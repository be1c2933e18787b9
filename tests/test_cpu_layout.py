"""ArgLayout.resolve: every argument check fails with a message that names the argument."""
from __future__ import annotations

import re

import pytest

from mlagen import families
from mlagen.abi import ArgumentError
from mlagen.runtime import DeviceArray

QK = families.get("qk_rmsnorm")
P = QK.validate({})                       # bf16 -> bf16, nq=1536, nk=512
LAYOUT = QK.layout(P)
BASE = 0x7F12_3400_0000


def _views(M: int = 4, **over) -> dict:
    v = dict(
        q=DeviceArray(BASE + 0x000000, (M, 1536), (1536, 1), "bf16", device=0),
        k=DeviceArray(BASE + 0x100000, (M, 512), (512, 1), "bf16", device=0),
        gamma_q=DeviceArray(BASE + 0x200000, (1536,), (1,), "f32", device=0),
        gamma_k=DeviceArray(BASE + 0x300000, (512,), (1,), "f32", device=0),
        qk_var=DeviceArray(BASE + 0x400000, (M, 2), (2, 1), "f32", device=0),
        q_out=DeviceArray(BASE + 0x500000, (M, 1536), (1536, 1), "bf16", device=0),
        k_out=DeviceArray(BASE + 0x600000, (M, 512), (512, 1), "bf16", device=0),
        eps=1e-6,
    )
    v.update(over)
    return v


def _arr(name, **kw):
    a = _views()[name]
    d = dict(ptr=a.ptr, shape=a.shape, strides=a.strides, dtype=a.dtype, device=0)
    d.update(kw)
    return DeviceArray(**d)


def _fails(views, *needles):
    with pytest.raises(ArgumentError) as ei:
        LAYOUT.resolve(views, "qk_test")
    msg = str(ei.value)
    for n in needles:
        assert re.search(n, msg), f"{n!r} not in message: {msg}"
    return msg


def test_valid_views_resolve():
    assert LAYOUT.resolve(_views(M=7), "qk_test") == dict(M=7, sq=1536, sk=512, sv=2, sqo=1536, sko=512)


def test_row_strided_views_resolve():
    v = _views(M=3, q=_arr("q", shape=(3, 1536), strides=(2048, 1)), qk_var=_arr("qk_var", shape=(3, 2), strides=(5, 1)),
               k=_arr("k", shape=(3, 512)), q_out=_arr("q_out", shape=(3, 1536)), k_out=_arr("k_out", shape=(3, 512)))
    assert LAYOUT.resolve(v, "qk_test") == dict(M=3, sq=2048, sk=512, sv=5, sqo=1536, sko=512)


def test_wrong_dtype_names_argument():
    _fails(_views(q=_arr("q", dtype="f16")), r"'q'", r"dtype f16", r"bf16")


def test_wrong_output_dtype_names_argument():
    _fails(_views(k_out=_arr("k_out", dtype="f32")), r"'k_out'", r"dtype f32")


def test_wrong_rank_names_argument():
    _fails(_views(k=_arr("k", shape=(4, 512, 1), strides=(512, 1, 1))), r"'k'", r"rank 3", r"rank 2")


def test_wrong_rank_of_vector_names_argument():
    _fails(_views(gamma_k=_arr("gamma_k", shape=(1, 512), strides=(512, 1))), r"'gamma_k'", r"rank")


def test_wrong_static_extent_names_argument():
    _fails(_views(gamma_q=_arr("gamma_q", shape=(1535,))), r"'gamma_q'", r"1535", r"1536")


def test_wrong_static_row_length_names_argument():
    _fails(_views(q_out=_arr("q_out", shape=(4, 1024), strides=(1024, 1))), r"'q_out'", r"1024", r"1536")


def test_wrong_static_stride_names_argument():
    _fails(_views(gamma_q=_arr("gamma_q", strides=(2,))), r"'gamma_q'", r"stride\[0\]")


def test_column_major_names_argument():
    _fails(_views(q=_arr("q", strides=(1, 4))), r"'q'", r"sq=1\b")


def test_misaligned_pointer_names_argument():
    _fails(_views(q_out=_arr("q_out", ptr=BASE + 0x500000 + 8)), r"'q_out'", r"16-byte aligned")


def test_misaligned_pointer_of_static_tensor_names_argument():
    _fails(_views(gamma_k=_arr("gamma_k", ptr=BASE + 0x300000 + 4)), r"'gamma_k'", r"aligned")


def test_qk_var_needs_only_4_byte_alignment():
    LAYOUT.resolve(_views(qk_var=_arr("qk_var", ptr=BASE + 0x400000 + 4)), "qk_test")
    _fails(_views(qk_var=_arr("qk_var", ptr=BASE + 0x400000 + 2)), r"'qk_var'", r"4-byte aligned")


def test_inconsistent_symbol_names_both_arguments():
    msg = _fails(_views(M=4, k=_arr("k", shape=(5, 512))), r"'k'", r"5", r"M=4")
    assert "'q'" in msg, msg


def test_inconsistent_symbol_in_output_names_it():
    _fails(_views(M=4, k_out=_arr("k_out", shape=(3, 512))), r"'k_out'", r"M=4")


def test_stride_not_divisible_names_argument():
    _fails(_views(q=_arr("q", strides=(1537, 1))), r"'q'", r"sq=1537", r"multiple of 8")


def test_qk_var_stride_need_not_be_divisible():
    LAYOUT.resolve(_views(qk_var=_arr("qk_var", strides=(3, 1))), "qk_test")


def test_negative_stride_names_argument():
    _fails(_views(k=_arr("k", strides=(-512, 1))), r"'k'", r"sk=-512")


def test_symbol_out_of_range_names_argument():
    big = 2 ** 31
    v = _views()
    v = {n: (DeviceArray(a.ptr, (big,) + tuple(a.shape[1:]), a.strides, a.dtype, 0)
             if isinstance(a, DeviceArray) and len(a.shape) == 2 else a) for n, a in v.items()}
    _fails(v, r"'q'", r"M=2147483648", r"32-bit")


def test_missing_argument_is_named():
    v = _views()
    del v["k_out"]
    _fails(v, r"missing", r"k_out")


def test_missing_scalar_is_named():
    v = _views()
    del v["eps"]
    _fails(v, r"missing", r"eps")


def test_message_names_the_kernel():
    _fails(_views(q=_arr("q", dtype="f32")), r"^qk_test: ")
