"""bench/qlora.py --small on the CPU, so the script the GPU run depends on cannot rot.

One method per model family (nf4compile compiled, bf16 compiled, bitsandbytes eager: the other methods only
combine these parts) takes one warm-up and one timed training step on the tiny Llama-2 shape at batch 1;
compiled methods are traced with the "eager" backend (fullgraph checked; no Inductor: test_qlora.py compiles
a training graph for real).
"""

import importlib.util
import json

import pytest

from helpers import bench_script

pytest.importorskip("peft", reason="bench/qlora.py needs peft: pip install 'nf4compile[train]'")


def _qlora():
    return bench_script("qlora")


def test_small_run_writes_every_method(tmp_path):
    qlora = _qlora()
    methods = ["nf4compile", "bf16-compiled", "bnb-eager"]
    report = qlora.main(["--small", "--batches", "1", "--steps", "1", "--methods", ",".join(methods),
                         "--compile-backend", "eager", "--out", str(tmp_path)])
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == methods
    for method, r in results.items():
        assert r["status"] == "ok", (method, r.get("error"), r.get("trace"))
        assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 1 and r["compile_s"] > 0
        assert 0 < r["loss_last"] < 10, "a finite loss near log(vocab) = 6.9 for random weights"
    (written,) = tmp_path.glob("qlora-small-*.json")
    assert json.loads(written.read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert [t["target"] for t in report["targets"]] == [t[0] for t in qlora.TARGETS]
    assert report["environment"]["peft"]
    if importlib.util.find_spec("matplotlib"):
        assert written.with_suffix(".png").stat().st_size > 10_000


def test_budget_skips_what_does_not_fit(tmp_path):
    qlora = _qlora()
    finished = {"nf4compile": 100.0, "bnb-eager": 10.0}
    assert qlora.estimate_s("bf16-compiled", finished) == pytest.approx(120.0)
    assert qlora.estimate_s("nf4compile-eager", finished) == pytest.approx(12.0)
    assert qlora.estimate_s("bf16-compiled", {}) == 0.0, "the first of its kind runs while any budget is left"
    report = qlora.main(["--small", "--batches", "1,4", "--methods", "bnb-eager", "--gpu-budget-s", "0", "--out", str(tmp_path)])
    assert [(r["batch"], r["status"]) for r in report["results"]] == [(1, "skipped"), (4, "skipped")]
    assert "budget" in report["results"][0]["reason"] and all(t["value"] is None for t in report["targets"])
