import os

import pytest
import torch

import nf4compile  # noqa: F401  registers the ops for every test module

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the test extra; without it only the property tests fail to import
    settings = None

if settings is not None:
    # Property tests (test_properties.py). "ci", the default: 25 derandomized examples per property,
    # shapes <= 256 (the Triton interpreter is slow). "gpu" (NF4COMPILE_HYPOTHESIS=gpu, bench/gpu_hardening.sh):
    # shapes up to 4097 on the GPU; each example compiles new kernel variants, so examples are counted.
    common = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])  # the seed fixture is harmless
    settings.register_profile("ci", max_examples=25, **common)
    settings.register_profile("gpu", max_examples=int(os.environ.get("NF4COMPILE_HYPOTHESIS_EXAMPLES", "60")), **common)
    settings.load_profile(os.environ.get("NF4COMPILE_HYPOTHESIS", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _bitsandbytes_reference_dequantize_on_this_cpu():
    """bitsandbytes is the format's oracle. Its native CPU dequantize_4bit (0.50.2), on AVX-512
    machines, mis-reads quantization blocks that span two weight rows (K % block_size != 0): there it
    disagrees with bitsandbytes' own reference kernel and its CUDA kernel, which agree with each other
    and with nf4compile. Where a probe shows that disagreement, CPU calls go to bitsandbytes'
    reference kernel for this session, so the oracle is bitsandbytes' algorithm, not that bug."""
    try:
        import bitsandbytes.functional as bnbF
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        yield
        return

    def reference(A, absmax, blocksize, quant_type, shape, dtype):
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax, code, blocksize, shape, dtype)

    probe = torch.randn(2, 96, generator=torch.Generator().manual_seed(0))
    packed, state = bnbF.quantize_4bit(probe, blocksize=64, quant_type="nf4")
    native = bnbF.dequantize_4bit(packed, state)
    if torch.equal(native, reference(packed, state.absmax, 64, "nf4", probe.shape, probe.dtype)):
        yield
        return
    library = torch.library.Library("bitsandbytes", "IMPL")  # replaces the CPU kernel until the session ends
    library.impl("dequantize_4bit", reference, "CPU")
    yield
    library._destroy()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
