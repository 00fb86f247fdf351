"""bench/host_overhead.py on the CPU (dispatch layers only), so the script the GPU run depends on cannot rot."""

from helpers import bench_script


def test_cpu_run_times_every_dispatch_layer(tmp_path):
    bench = bench_script("host_overhead")
    report = bench.main(["--calls", "5", "--out", str(tmp_path)])
    rows = report["us_per_call"]
    assert (tmp_path / "host-overhead-cpu.json").exists()
    assert {"torch.ops.nf4compile.linear", "F.linear(x, NF4Tensor)", "empty op, torch.library.Library",
            "empty op, torch.library.custom_op"} <= rows.keys()
    assert all(us > 0 for us in rows.values())
