"""bench/profile_steps.py --small on the CPU, so the profile a GPU run depends on cannot rot."""

import json

import pytest

from helpers import bench_script


def _profile_steps():
    return bench_script("profile_steps")  # it imports e2e and qlora from beside it itself


def test_kernel_kinds():
    kind_of = _profile_steps().kind_of
    assert kind_of("_nf4_gemv_kernel") == "nf4 gemv"
    assert kind_of("_nf4_mm_kernel") == "nf4 fused gemm"
    assert kind_of("_nf4_mma_gemv_kernel") == "nf4 mma gemv"
    assert kind_of("nvjet_tst_128x64_64x8_1x1_v_bz_coopA_TNT") == "cuBLAS"
    assert kind_of("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "inductor triton"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, ...>") == "aten elementwise"
    assert kind_of("something_else") == "other"


@pytest.mark.parametrize("workload", ["decode", "qlora"])
def test_small_run_profiles_every_config(workload, tmp_path):
    if workload == "qlora":
        pytest.importorskip("peft")
    report = _profile_steps().main([workload, "--small", "--compile-backend", "eager", "--out", str(tmp_path)])
    assert list(report["results"]) == ["nf4compile:1", "bf16-compiled:1"]
    for result in report["results"].values():
        assert result["wall_us_per_step"] > 0 and result["top_cpu_self"], result
    (written,) = tmp_path.glob(f"profile-{workload}-small-*.json")
    assert json.loads(written.read_text())["results"].keys() == report["results"].keys()
