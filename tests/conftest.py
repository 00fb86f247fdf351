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


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
