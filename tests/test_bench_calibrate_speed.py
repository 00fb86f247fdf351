"""bench/calibrate_speed.py --small on the CPU, so the script the GPU run depends on cannot rot."""

import json

from helpers import bench_script


def test_small_run_times_every_method(tmp_path):
    bench = bench_script("calibrate_speed")
    report = bench.main(["--small", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "calibrate-speed-cpu.json").read_text()) == json.loads(json.dumps(report))
    assert [r["layer"] for r in report["rows"]] == list(bench.SMALL_LAYER)
    assert all(r[k] > 0 for r in report["rows"] for k in ("scale_search_s", "scale_search_with_h_s", "gptq_s"))
    whole = report["whole_model_s"]
    assert whole["GPTQ + scale search"] > whole["scale search with H"] > 0
