"""Custom ops ``torch.ops.nf4compile.{quantize,dequantize,linear}`` (imported as ``nf4compile.ops``)."""

from nf4compile.ops.nf4_ops import dequantize, linear, quantize

__all__ = ["dequantize", "linear", "quantize"]
