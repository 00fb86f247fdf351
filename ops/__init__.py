"""Custom ops ``torch.ops.nf4compile.{quantize,dequantize,linear}`` (imported as ``nf4compile.ops``)."""

import importlib.util

from nf4compile.ops.nf4_ops import dequantize, linear, quantize

if importlib.util.find_spec("triton") is not None:  # Triton is a dependency on Linux only
    from nf4compile.ops import triton_linear  # noqa: F401  registers the CUDA kernels

__all__ = ["dequantize", "linear", "quantize"]
