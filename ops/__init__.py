"""Custom ops ``torch.ops.nf4compile.{quantize,dequantize,linear}`` (imported as ``nf4compile.ops``)."""

import importlib.util

import torch

from nf4compile.ops.nf4_ops import dequantize, linear, quantize

_HAS_TRITON = importlib.util.find_spec("triton") is not None  # a dependency on Linux only
if _HAS_TRITON:
    from nf4compile.ops import triton_dequantize, triton_linear  # noqa: F401  registers the CUDA kernels


def prepare_device(device: torch.device) -> None:
    """Copy the kernels' lookup tables to ``device`` now, eagerly: if the first kernel call came in a
    CUDA-graph warm-up (``mode="reduce-overhead"``), they would land in the graph's private pool."""
    if _HAS_TRITON and device.type == "cuda":
        triton_dequantize.lookup_tables(device)


__all__ = ["dequantize", "linear", "prepare_device", "quantize"]
