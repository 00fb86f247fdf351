"""``nf4compile.report(model, reference_model=None, inputs=None)``: what quantization did, layer by layer.

Always (from the quantized model alone): per Linear/Conv1D layer its shape, NF4 or why it stayed dense,
block size, double quant, weight bytes before/after. An NF4 weight no longer knows the weight it came
from, so everything that measures error needs the original model:
- ``reference_model`` (the dense model, same module names): weight reconstruction error per layer,
  relative Frobenius ``|W - deq(W)| / |W|`` and SQNR ``20 log10(|W| / |W - deq(W)|)`` dB;
- ``reference_model`` and ``inputs`` (one batch: a tensor, a tuple of positional inputs or a dict of keyword
  inputs): per layer the relative output error alone (the NF4 layer fed the reference layer's input, so
  only its own error) and in the model (the quantized model's own activations, so upstream error included),
  and for the whole model the relative output error and, when it returns logits, KL(reference || NF4) of
  the next-token distributions and top-1 agreement.
A layer is flagged sensitive when its error (output error alone if measured, else weight error) exceeds
SENSITIVE_FACTOR x the median over the NF4 layers: the candidates for ``NF4Config(skip=...)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nf4compile.policy import quantizable_layers
from nf4compile.quantize import summary
from nf4compile.tensor import NF4Tensor

SENSITIVE_FACTOR = 2.0


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    quantized: bool
    reason: str  # why it stayed dense ("" when NF4)
    block_size: Optional[int]
    double_quant: Optional[bool]
    bytes_before: int
    bytes_after: int
    weight_rel_error: Optional[float] = None
    weight_sqnr_db: Optional[float] = None
    output_rel_error: Optional[float] = None  # this layer alone, on the reference layer's input
    output_rel_error_in_model: Optional[float] = None  # inside the quantized model, upstream error included
    sensitive: bool = False


@dataclass
class Report:
    layers: list[LayerReport]
    model: dict[str, Any] = field(default_factory=dict)  # bytes; with inputs: output error, KL, top-1
    notes: list[str] = field(default_factory=list)  # what could not be computed, and why

    def as_dict(self) -> dict:
        return {"layers": [dataclasses.asdict(layer) for layer in self.layers], "model": self.model, "notes": self.notes}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.as_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def __str__(self) -> str:
        def num(value, fmt):
            return "-" if value is None else format(value, fmt)

        rows = [f"{'layer':44s} {'shape':>12s} {'block':>5s} {'before':>10s} {'after':>10s} {'w err':>8s} {'SQNR dB':>7s} "
                f"{'out err':>8s} {'in model':>8s}  status"]
        for r in self.layers:
            status = ("NF4" + (" SENSITIVE" if r.sensitive else "")) if r.quantized else f"dense: {r.reason}"
            rows.append(
                f"{r.name:44s} {'x'.join(map(str, r.shape)):>12s} {num(r.block_size, 'd'):>5s} {r.bytes_before:>10d} "
                f"{r.bytes_after:>10d} {num(r.weight_rel_error, '.4f'):>8s} {num(r.weight_sqnr_db, '.1f'):>7s} "
                f"{num(r.output_rel_error, '.4f'):>8s} {num(r.output_rel_error_in_model, '.4f'):>8s}  {status}"
            )
        m = self.model
        rows.append(f"weights {m['bytes_before'] / 2**20:.2f} MiB -> {m['bytes_after'] / 2**20:.2f} MiB "
                    f"({m['bytes_before'] / max(m['bytes_after'], 1):.2f}x smaller) over {len(self.layers)} linear layers")
        if "output_rel_error" in m:
            line = f"whole model: relative output error {m['output_rel_error']:.4f}"
            if "logit_kl" in m:
                line += f", logit KL(reference || NF4) {m['logit_kl']:.3g} nats, top-1 agreement {m['top1_agreement']:.1%}"
            rows.append(line)
        rows += [f"note: {note}" for note in self.notes]
        return "\n".join(rows)

    def plot(self, path) -> Path:
        """Per-layer error bars (PNG); sensitive layers red, dense layers grey. Needs matplotlib (extra "plot")."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("Report.plot needs matplotlib: pip install 'nf4compile[plot]'") from None
        key = "output_rel_error" if any(r.output_rel_error is not None for r in self.layers) else "weight_rel_error"
        values = [getattr(r, key) or 0.0 for r in self.layers]
        colors = ["tab:red" if r.sensitive else "tab:blue" if r.quantized else "tab:gray" for r in self.layers]
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.18 * len(self.layers)))
        ax.barh(range(len(self.layers)), values, color=colors)
        if key == "output_rel_error":
            in_model = [r.output_rel_error_in_model or 0.0 for r in self.layers]
            ax.scatter(in_model, range(len(self.layers)), marker="|", color="black", label="in the model (upstream error included)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_yticks(range(len(self.layers)), [r.name for r in self.layers], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel(key.replace("_", " ") + " (red: sensitive, > %.3gx median; grey: kept dense)" % SENSITIVE_FACTOR, fontsize=8)
        title = "nf4compile report"
        if "logit_kl" in self.model:
            title += f": logit KL {self.model['logit_kl']:.3g}, top-1 {self.model['top1_agreement']:.1%}"
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    norm = reference.double().norm()
    return (error.double().norm() / norm).item() if norm > 0 else float(error.double().norm() > 0)


def _weight_error(weight: torch.Tensor, reference: torch.Tensor) -> tuple[float, Optional[float]]:
    dense = weight.dequantize(torch.float32) if isinstance(weight, NF4Tensor) else weight.float()
    reference = reference.detach().float().to(dense.device)
    error = (dense - reference).double().norm()
    rel = _relative(dense - reference, reference)
    sqnr = 20 * math.log10(reference.double().norm().item() / error.item()) if error > 0 else None  # exact: no finite SQNR
    return rel, sqnr


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    return next(v for v in output if isinstance(v, torch.Tensor))


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _output_errors(model, reference, inputs, names) -> tuple[dict, dict, dict]:
    """(error alone per layer, error in the model per layer, whole-model figures)."""
    ours = dict(model.named_modules())
    alone, in_model, ref_outputs, hooks = {}, {}, {}, []
    phase = ["reference"]  # the NF4 layers also run inside the reference pass (for "alone"): not "in the model"

    def on_reference(name):
        def hook(module, args, kwargs, output):
            ref_outputs[name] = output
            alone[name] = _relative(ours[name](*args, **kwargs) - output, output)  # the NF4 layer, same input

        return hook

    def on_quantized(name):
        def hook(module, args, kwargs, output):
            if phase[0] == "quantized" and name in ref_outputs:
                in_model[name] = _relative(output - ref_outputs[name], ref_outputs[name])

        return hook

    try:
        for name in names:
            hooks.append(reference.get_submodule(name).register_forward_hook(on_reference(name), with_kwargs=True))
            hooks.append(ours[name].register_forward_hook(on_quantized(name), with_kwargs=True))
        with torch.no_grad():
            ref_out = _call(reference, inputs)
            phase[0] = "quantized"
            out = _call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    whole = {"output_rel_error": _relative(_first_tensor(out).float() - _first_tensor(ref_out).float(), _first_tensor(ref_out).float())}
    if hasattr(ref_out, "logits") or isinstance(ref_out, torch.Tensor):
        log_p = F.log_softmax(_first_tensor(ref_out).float(), dim=-1)
        log_q = F.log_softmax(_first_tensor(out).float(), dim=-1)
        whole["logit_kl"] = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean().item()
        whole["top1_agreement"] = (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item()
    return alone, in_model, whole


def report(model: nn.Module, reference_model: Optional[nn.Module] = None, inputs=None) -> Report:
    """Audit a quantized model; see the module docstring for what each argument makes measurable."""
    reasons = {layer.name: layer for layer in summary(model).layers}
    layers = []
    for name, module in quantizable_layers(model):
        s, weight = reasons[name], module.weight
        nf4 = isinstance(weight, NF4Tensor)
        layers.append(LayerReport(
            name, s.shape, s.quantized, s.reason, weight.block_size if nf4 else None,
            weight.double_quant if nf4 else None, s.bytes_before, s.bytes_after,
        ))
    result = Report(layers, {"bytes_before": sum(r.bytes_before for r in layers), "bytes_after": sum(r.bytes_after for r in layers)})
    if reference_model is None:
        result.notes.append("no reference_model: weight and output errors need the original dense weights, "
                            "which an NF4 weight no longer has (shapes, block sizes and bytes are exact)")
        if inputs is not None:
            result.notes.append("inputs ignored: output errors compare against the reference model")
        return result

    reference_layers = dict(quantizable_layers(reference_model))
    missing = [r.name for r in layers if r.name not in reference_layers]
    if missing:
        result.notes.append(f"not in the reference model, no error computed: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    from tqdm.auto import tqdm

    for r in tqdm(layers, desc="nf4compile.report", unit="layer", disable=len(layers) < 32):  # a 7B: 225 dequantizes
        if r.name in reference_layers:
            r.weight_rel_error, r.weight_sqnr_db = _weight_error(model.get_submodule(r.name).weight, reference_layers[r.name].weight)
    if inputs is not None:
        names = [r.name for r in layers if r.name in reference_layers]
        alone, in_model, whole = _output_errors(model, reference_model, inputs, names)
        for r in layers:
            r.output_rel_error, r.output_rel_error_in_model = alone.get(r.name), in_model.get(r.name)
        result.model.update(whole)
    else:
        result.notes.append("no inputs: per-layer output errors and the whole-model KL / top-1 need a batch of inputs")
    key = "output_rel_error" if inputs is not None else "weight_rel_error"
    errors = [getattr(r, key) for r in layers if r.quantized and getattr(r, key) is not None]
    if errors:
        threshold = SENSITIVE_FACTOR * statistics.median(errors)
        for r in layers:
            r.sensitive = r.quantized and (getattr(r, key) or 0.0) > threshold
    return result
