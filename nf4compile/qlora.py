"""QLoRA with peft: LoRA adapters trained on frozen NF4 layers, and merged back.

Training needs nothing registered with peft. A quantized layer is still an ``nn.Linear`` (or ``Conv1D``)
whose weight is an NF4Tensor, so peft's default dispatch wraps it in its own ``lora.Linear``: that forward
calls the base layer, and the NF4Tensor dispatch contract does the rest, eagerly and under torch.compile,
forward and backward (``grad_x = grad_out @ W`` by the fused op with ``x_at_w=True``). The NF4 weight never
requires grad, so only the adapters train. peft places the adapters by the weight's device and dtype, which
an NF4Tensor reports as those of the dense weight it replaces.

Merging is what peft cannot do: its merge adds the update to the base weight in place, and an NF4 weight
changes only by re-quantization, which loses information. ``merge_and_unload`` makes that choice explicit
and reports what re-quantizing cost.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from nf4compile.tensor import NF4Tensor, quantize_like


@dataclass
class MergedLayer:
    """One NF4 layer after merging: norms are Frobenius norms, errors against the exact fp32 W + ΔW."""

    name: str
    shape: tuple[int, ...]
    stored_as: str  # "nf4" (re-quantized in the layer's own format) or the dense dtype, e.g. "bfloat16"
    update_norm: float  # ||ΔW||, the merged adapters' update
    merged_norm: float  # ||W + ΔW||
    error_norm: float  # ||stored - (W + ΔW)||
    max_abs_error: float

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.merged_norm if self.merged_norm else 0.0

    @property
    def error_to_update(self) -> float:
        """Storage error over the update: at 1 or more the stored weight is as far from the merged one as
        the adapter moved it, i.e. the merge kept little of what was trained."""
        return self.error_norm / self.update_norm if self.update_norm else math.inf


@dataclass
class MergeReport:
    layers: list[MergedLayer]

    def as_dict(self) -> dict:
        return {
            "layers": [
                {**dataclasses.asdict(layer), "relative_error": layer.relative_error, "error_to_update": layer.error_to_update}
                for layer in self.layers
            ]
        }

    def __str__(self) -> str:
        rows = [f"{'layer':44s} {'stored as':>10s} {'rel. error':>11s} {'max |err|':>10s} {'err/update':>11s}"]
        for layer in self.layers:
            rows.append(
                f"{layer.name:44s} {layer.stored_as:>10s} {layer.relative_error:11.3e} "
                f"{layer.max_abs_error:10.3e} {layer.error_to_update:11.3f}"
            )
        if self.layers:
            worst = max(self.layers, key=lambda layer: layer.error_to_update)
            rows.append(
                f"{len(self.layers)} NF4 layers merged; largest error/update {worst.error_to_update:.3f} ({worst.name})"
                + ("; >= 1 means re-quantization noise as large as the trained update" if worst.error_to_update >= 1 else "")
            )
        return "\n".join(rows)


def merge_and_unload(
    peft_model: nn.Module, *, requantize: bool, adapter_names: Optional[Sequence[str]] = None
) -> tuple[nn.Module, MergeReport]:
    """Merge the LoRA adapters of a peft model into its layers and return (base model, report).

    NF4 layers get ``W + ΔW`` computed in fp32 from the dequantized weight, stored either dense in the
    weight's compute dtype (``requantize=False``: a bf16 model, exact up to bf16 rounding) or re-quantized
    to NF4 in the layer's own format (``requantize=True``: 4-bit memory, NF4 rounding error). The report
    gives, per NF4 layer, the storage error against the exact merged weight and its ratio to the update.
    Dense layers with adapters are merged by peft itself. ``adapter_names``: default, the active adapters.
    One layer is dequantized at a time. The adapters of every layer are checked before any layer changes.
    """
    from peft.tuners.lora import LoraLayer

    lora_layers = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    nf4_layers = []
    for name, layer in lora_layers:
        if isinstance(getattr(layer.get_base_layer(), "weight", None), NF4Tensor):
            adapters = [a for a in (adapter_names or layer.active_adapters) if a in layer.lora_A]
            for adapter in adapters:
                if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
                    raise ValueError(f"nf4compile.merge_and_unload: {name}: adapter {adapter!r} uses DoRA or lora_bias, "
                                     "which NF4 layers do not support")
            nf4_layers.append((name, layer, adapters))

    report = MergeReport([])
    for name, layer, adapters in nf4_layers:
        base = layer.get_base_layer()
        report.layers.append(_merge_nf4(name.removeprefix("base_model.model."), base, layer, adapters, requantize))
    merged = {id(layer) for _, layer, _ in nf4_layers}
    for _, layer in lora_layers:
        if id(layer) not in merged:
            layer.merge(adapter_names=list(adapter_names) if adapter_names else None)
    return peft_model.unload(), report


@torch.no_grad()
def _merge_nf4(name: str, base: nn.Module, layer: nn.Module, adapters: list[str], requantize: bool) -> MergedLayer:
    weight: NF4Tensor = base.weight
    exact = weight.dequantize().float()  # the weight as the layer computes with it, shaped as it presents
    update = torch.zeros_like(exact)
    for adapter in adapters:
        update += layer.get_delta_weight(adapter).float()
    exact += update
    if requantize:
        stored = quantize_like(exact, weight)
        error = stored.dequantize().float() - exact
    else:
        stored = exact.to(weight.dtype)
        error = stored.float() - exact
    base.weight = nn.Parameter(stored, requires_grad=False)
    return MergedLayer(
        name=name,
        shape=tuple(weight.shape),
        stored_as="nf4" if requantize else str(weight.dtype).removeprefix("torch."),
        update_norm=update.norm().item(),
        merged_norm=exact.norm().item(),
        error_norm=error.norm().item(),
        max_abs_error=error.abs().max().item(),
    )
