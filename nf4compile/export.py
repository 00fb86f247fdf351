"""``nf4compile.export``: torch.export of a quantized model, with the NF4 matmuls fused.

An NF4Tensor parameter is unwrapped by export into its inner tensors, which the program names
``<module>.parametrizations.weight.original{i}``, i indexing ``packed, absmax[, nested_absmax, offset]``
(``NF4Tensor.__tensor_flatten__`` order). ``parameter_names(ep)`` maps them back; in a bitsandbytes
checkpoint (``nf4compile.save``) they are ``<module>.weight``, ``<module>.weight.absmax``,
``<module>.weight.nested_absmax``, and the ``nested_offset`` of ``<module>.weight.quant_state.bitsandbytes__nf4``.
A sensitive layer kept dense by KeepSensitiveBF16 appears under its own name, ``<module>.weight``.

The program is saved and loaded with ``torch.export.save``/``torch.export.load``; loading needs
``import nf4compile`` first, which registers the ``nf4compile`` ops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.export import ExportedProgram

from nf4compile import passes
from nf4compile.passes.manager import DEFAULT_SENSITIVE
from nf4compile.passes.names import inner_tensor_index, module_name
from nf4compile.policy import sensitive_layers
from nf4compile.tensor import NF4Tensor


def export(
    model: nn.Module,
    args: tuple,
    kwargs: Optional[dict[str, Any]] = None,
    dynamic_shapes: Any = None,
    *,
    strict: bool = False,
    decompositions: Optional[dict] = None,
) -> ExportedProgram:
    """``torch.export.export``, decomposed (``decompositions`` as ``run_decompositions``; default core
    ATen), then the nf4compile passes: matmuls on NF4 weights become ``nf4compile.linear``, and sensitive
    layers of ``model`` that are still NF4 become dense parameters (unless the model was quantized with
    ``keep_sensitive=False``; fusion follows ``NF4Config.fuse``)."""
    config = getattr(model, "_nf4compile_config", None)
    keep_sensitive = getattr(config, "keep_sensitive", True)
    sensitive = {**DEFAULT_SENSITIVE, **sensitive_layers(model)} if keep_sensitive else {}
    ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return passes.apply(ep, sensitive, fuse=getattr(config, "fuse", True), decompositions=decompositions)


def parameter_names(ep: ExportedProgram) -> dict[str, tuple[str, Optional[str]]]:
    """{program state-dict key: (module parameter name, NF4Tensor inner tensor or None)}.

    ``"fc.parametrizations.weight.original1"`` -> ``("fc.weight", "absmax")``; ``"fc.bias"`` -> ``("fc.bias", None)``.
    """
    inner_names = NF4Tensor.tensor_data_names + NF4Tensor.optional_tensor_data_names
    names = {}
    for key in list(ep.state_dict) + list(ep.constants):
        i = inner_tensor_index(key)
        names[key] = (module_name(key), inner_names[i] if i is not None else None)
    return names
