"""bench/e2e.py --small on the CPU, so the script the GPU run depends on cannot rot.

Every method of the plan runs on the tiny Llama-2 shape at batch 1; compiled methods are traced with the
"eager" backend (fullgraph checked, no Inductor: test_models.py compiles for real).
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from helpers import bench_script


@pytest.mark.slow
def test_small_run_writes_every_method(tmp_path):
    e2e = bench_script("e2e")
    report = e2e.main(["--small", "--batches", "1", "--models", "llama-2-7b", "--compile-backend", "eager", "--out", str(tmp_path)])
    methods = {method for name, batch, method in e2e.PLAN if name == "llama-2-7b" and batch == 1}
    results = {r["method"]: r for r in report["results"]}
    assert set(results) == methods
    for method, r in results.items():
        assert r["status"] == "ok", (method, r.get("error"), r.get("trace"))
        assert r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 and r["new_tokens"] == 8
        assert (r["compile_s"] is not None) == (method in e2e.COMPILED)
        if method in e2e.COMPILED:  # the warm-up's breakdown: its eager prefill and Dynamo's own time within it
            assert 0 < r["compile_prefill_s"] < r["compile_s"]
            assert 0 < r["compile_phases_s"]["_compile.compile_inner"] < r["compile_s"]
            assert r["compile_cache_hits"] >= 0
    (written,) = tmp_path.glob("e2e-small-*.json")
    assert json.loads(written.read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert [t["target"] for t in report["targets"]] == [t[0] for t in e2e.TARGETS]
    if importlib.util.find_spec("matplotlib"):
        assert written.with_suffix(".png").stat().st_size > 10_000


def test_compile_time_target_compares_cold_compiles_only():
    e2e = bench_script("e2e")
    nf4, bf16 = dict(compile_s=36.0, compile_cache_hits=0), dict(compile_s=24.0, compile_cache_hits=0)
    assert e2e.cold_compile_ratio(nf4, bf16) == 1.5
    assert e2e.cold_compile_ratio(dict(nf4, compile_cache_hits=2), bf16) is None
    assert e2e.cold_compile_ratio(nf4, dict(bf16, compile_cache_hits=1)) is None
    assert e2e.cold_compile_ratio(dict(nf4, compile_profile={}), bf16) is None  # cProfile's slowdown


def test_profile_compile_records_where_the_warm_up_went(tmp_path):
    e2e = bench_script("e2e")
    report = e2e.main(["--small", "--batches", "1", "--models", "llama-2-7b", "--methods", "nf4compile,bf16-eager",
                       "--compile-backend", "eager", "--profile-compile", "5", "--out", str(tmp_path)])
    results = {r["method"]: r for r in report["results"]}
    profile = results["nf4compile"]["compile_profile"]
    assert len(profile["top"]) == 5 and profile["top"][0]["cum_s"] >= profile["top"][-1]["cum_s"] > 0
    # Tracing runs the NF4 subclass's dispatch and the ops' fake implementations: nf4compile's own code.
    assert 0 < profile["nf4compile_self_s"] < profile["top"][0]["cum_s"]
    assert profile["triton_compile_s"] >= 0
    assert "compile_profile" not in results["bf16-eager"]  # not compiled: nothing profiled


def test_compiles_cache_into_a_fresh_directory_unless_warm_caches_are_asked_for(monkeypatch):
    e2e = bench_script("e2e")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/machine/cache")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with e2e.compile_caches(warm=False):
        fresh = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert fresh != "/machine/cache" and Path(fresh).is_dir() and not any(Path(fresh).iterdir())
        assert os.environ["TRITON_CACHE_DIR"].startswith(fresh)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/machine/cache" and "TRITON_CACHE_DIR" not in os.environ
    assert not Path(fresh).exists()
    with e2e.compile_caches(warm=True):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/machine/cache"


def test_budget_skips_what_does_not_fit(tmp_path):
    e2e = bench_script("e2e")
    report = e2e.main(["--small", "--batches", "1", "--models", "llama-2-7b", "--methods", "bf16-eager",
                       "--gpu-budget-s", "0", "--out", str(tmp_path)])
    (entry,) = report["results"]
    assert entry["status"] == "skipped" and "budget" in entry["reason"]


@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("NF4COMPILE_TEST_GPU_MATRIX") != "1", reason="a minute of compiles: NF4COMPILE_TEST_GPU_MATRIX=1")
def test_small_run_on_the_gpu(tmp_path):
    """Every method on the GPU with tiny shapes, CUDA graphs and Inductor: the code paths of the real run."""
    e2e = bench_script("e2e")
    report = e2e.main(["--small", "--device", "cuda", "--batches", "1", "--models", "llama-2-7b", "--out", str(tmp_path)])
    results = {r["method"]: r for r in report["results"]}
    for method in ("nf4compile", "bf16-compiled", "nf4compile-unfused", "bnb-eager", "bf16-eager"):
        assert results[method]["status"] == "ok", (method, results[method].get("trace"))
        assert results[method]["peak_gb"] > 0 and results[method]["weight_gb"] > 0
    # Two layers: q/k/v and gate/up grouped, o and down alone.
    assert results["nf4compile"]["fused_linear_calls"] == 4 and results["nf4compile"]["linear_group_calls"] == 4
    assert results["nf4compile"]["dequantize_calls"] == 0
    assert results["nf4compile-unfused"]["fused_linear_calls"] == 0
