"""The tuned dispatch table end to end on the GPU: results/ -> mlagen export -> Dispatcher -> launch."""
import os
from pathlib import Path

import numpy as np
import pytest

from mlagen import families, runtime, tune
from mlagen.interop import to_numpy, to_torch
from mlagen.numerics import rel_err

from conftest import bundles_root

pytestmark = pytest.mark.gpu
BENCH = bundles_root().parent / "bench"


@pytest.mark.skipif(not (BENCH.exists() and Path("results/bench.parquet").exists()),
                    reason="needs build/gpu/bench bundles and results/bench.parquet")
def test_exported_table_picks_the_measured_best(tmp_path, rng, record_property):
    import torch
    kernels = [runtime.load(b) for b in runtime.find_bundles(BENCH, "qk_rmsnorm")]
    if not kernels:    # a device run that carried only another family's bench bundles
        pytest.skip(f"no qk_rmsnorm bundles in {BENCH}")
    table = tune.export("results", tmp_path / "dispatch.json")
    d = runtime.Dispatcher(kernels, table, device_name=torch.cuda.get_device_name(0))
    fam = families.get("qk_rmsnorm")
    for M in (16384, 1000):
        p = kernels[0].params
        x = fam.make_problem(p, {"M": M}, rng).inputs
        args = dict(q=to_torch(x["q"], p["dtype"]), k=to_torch(x["k"], p["dtype"]),
                    gamma_q=to_torch(x["gamma_q"], "f32"), gamma_k=to_torch(x["gamma_k"], "f32"),
                    qk_var=to_torch(x["qk_var"], "f32"), eps=1e-6)
        chosen = d.select(args)
        key = fam.table_key(chosen.params, {"M": M})
        entry = table["qk_rmsnorm"].get(torch.cuda.get_device_name(0), {}).get(key)
        record_property(f"M{M}", f"{chosen.name} ({d.last_reason})")
        if entry is not None and any(k.name == entry["kernel"] for k in kernels):
            assert chosen.name == entry["kernel"] and "tuned table" in d.last_reason
        out = d(**args)
        torch.cuda.synchronize()
        assert rel_err(to_numpy(out["q_out"], p["out_dtype"]), fam.reference(p, x)["q_out"]) < 1e-2
