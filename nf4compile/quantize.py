"""``nf4compile.quantize(model, config)``: swap Linear/Conv1D weights for NF4Tensors, atomically."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from nf4compile import format as nf4_format
from nf4compile.policy import is_conv1d, name_matches, quantizable_layers, sensitive_layers
from nf4compile.serialization import register_state_dict_hooks
from nf4compile.tensor import NF4Tensor, check_quantizable, to_nf4

try:  # torchao is optional at run time: with it, NF4Config also works through torchao's quantize_
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.transform_module import register_quantize_module_handler
except ImportError:  # pragma: no cover - exercised only where torchao is absent
    AOBaseConfig, register_quantize_module_handler = object, None


@dataclass
class NF4Config(AOBaseConfig):
    """How ``quantize`` converts a model.

    block_size: elements per absmax scale (a power of two, 32 ... 4096; bitsandbytes uses 64).
    double_quant: quantize the scales too (8-bit, bitsandbytes' ``compress_statistics``).
    skip: module names or regexes to keep dense, on top of the sensitive layers.
    include: if given, only modules matching these names or regexes are quantized.
    keep_sensitive: keep lm_head / output embeddings / weights tied to embeddings dense.
    min_numel: layers whose weight has fewer elements stay dense.
    fuse: torch.compile fuses dequantize + matmul into nf4compile.linear (off: to benchmark the unfused graph;
    also NF4COMPILE_FUSE=0). Applies to compilations after this call (the Inductor passes are global).

    Calibrated NF4 (nf4compile.calibrate; same format, better accuracy):
    scale_search: per block, the scale ≤ absmax with the smallest (activation-weighted, given
    calibration data) reconstruction error. None: on with method="gptq", off otherwise.
    method: "nearest" (bitsandbytes' rounding) or "gptq" (error-compensating rounding; needs
    calibration data and in_features % block_size == 0).
    keep_budget: keep the layers most sensitive on the calibration data in their original dtype,
    spending at most this fraction of the all-NF4 bytes (needs calibration data).
    """

    block_size: int = 64
    double_quant: bool = True
    skip: Sequence[str] = field(default_factory=tuple)
    include: Optional[Sequence[str]] = None
    keep_sensitive: bool = True
    min_numel: int = 0
    fuse: bool = True
    scale_search: Optional[bool] = None
    method: str = "nearest"
    keep_budget: float = 0.0

    def __post_init__(self):
        nf4_format.check_block_size(self.block_size)
        for name in ("skip", "include"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"NF4Config.{name} takes a list of names or regexes, not the string {value!r}")
            if value is not None:
                setattr(self, name, tuple(value))
        if self.min_numel < 0:
            raise ValueError(f"NF4Config.min_numel must be >= 0, got {self.min_numel}")
        if self.method not in ("nearest", "gptq"):
            raise ValueError(f"NF4Config.method must be 'nearest' or 'gptq', got {self.method!r}")
        if not 0 <= self.keep_budget < 1:
            raise ValueError(f"NF4Config.keep_budget is a fraction of the NF4 bytes in [0, 1), got {self.keep_budget}")
        if self.scale_search is None:
            self.scale_search = self.method == "gptq"

    @property
    def calibrated(self) -> bool:
        return self.scale_search or self.method == "gptq" or self.keep_budget > 0


def skip_reason(
    name: str,
    module: nn.Module,
    config: NF4Config,
    sensitive: dict[str, str],
    filter_fn: Optional[Callable[[nn.Module, str], bool]],
) -> Optional[str]:
    if isinstance(module.weight, NF4Tensor):
        return "already NF4"
    if config.keep_sensitive and name in sensitive:
        return sensitive[name]
    if name_matches(name, config.skip):
        return "in NF4Config.skip"
    if config.include is not None and not name_matches(name, config.include):
        return "not in NF4Config.include"
    if filter_fn is not None and not filter_fn(module, name):
        return "filter_fn returned False"
    if module.weight.numel() < config.min_numel:
        return f"fewer than min_numel={config.min_numel} elements"
    return None


def _calibrator(model: nn.Module, todo: list[tuple[str, nn.Module]], config: NF4Config, calibration: Optional[Iterable]):
    if not config.calibrated:
        if calibration is not None:
            raise ValueError("calibration data given, but the NF4Config uses none (set scale_search, method='gptq' or keep_budget)")
        return None
    from nf4compile.calibrate import Calibrator

    return Calibrator(model, dict(todo), config, calibration)


def quantize(
    model: nn.Module,
    config: Optional[NF4Config] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    *,
    calibration: Optional[Iterable] = None,
    show_progress: Optional[bool] = None,
) -> nn.Module:
    """Replace the weight of every eligible ``nn.Linear``/``Conv1D`` by an NF4Tensor, in place.

    ``calibration``: model inputs (tensors, tuples of positional inputs or dicts of keyword inputs)
    for the calibrated modes of ``config`` (scale_search, method="gptq", keep_budget).
    Everything is validated and quantized before any weight is swapped in: on any error the model
    is exactly as it was. Returns ``model``.
    """
    from tqdm.auto import tqdm

    config = config or NF4Config()
    if not isinstance(config, NF4Config):
        raise TypeError(f"config must be an nf4compile.NF4Config, got {type(config).__name__}")
    sensitive = sensitive_layers(model)
    skipped: dict[str, str] = {}
    todo: list[tuple[str, nn.Module]] = []
    for name, module in quantizable_layers(model):
        reason = skip_reason(name, module, config, sensitive, filter_fn)
        if reason is None:
            todo.append((name, module))
        else:
            skipped[name] = reason

    staged: list[tuple[str, nn.Module, NF4Tensor]] = []
    progress = tqdm(todo, desc="nf4compile.quantize", unit="layer", disable=show_progress is False or (show_progress is None and len(todo) < 32))
    try:
        for name, module in todo:  # every weight is checked before any (possibly long) calibration pass
            check_quantizable(module.weight.detach(), f"{name}.weight" if name else "weight")
        calibrator = _calibrator(model, todo, config, calibration)
        for name, module in progress:
            weight = module.weight.detach()
            conv1d = is_conv1d(module)  # Conv1D holds [in, out]; NF4 data is [out, in] as in bitsandbytes
            weight = weight.t() if conv1d else weight
            nf4 = calibrator.to_nf4(name, weight) if calibrator else to_nf4(weight, config.block_size, config.double_quant)
            staged.append((name, module, nf4.t() if conv1d else nf4))
        if config.keep_budget:
            kept = calibrator.keep_dense(model, {name: weight for name, _, weight in staged})
            staged = [entry for entry in staged if entry[0] not in kept]
            skipped.update(kept)
    except (TypeError, ValueError) as e:
        raise type(e)(f"nf4compile.quantize: model left unchanged: {e}") from None

    for _, module, weight in staged:
        module.weight = nn.Parameter(weight, requires_grad=False)
        register_state_dict_hooks(module)
    model._nf4compile_skipped = {**getattr(model, "_nf4compile_skipped", {}), **skipped}
    model._nf4compile_config = config
    from nf4compile.passes import register_for_model  # the Inductor passes, on first use, never at import

    register_for_model(model, fuse=config.fuse, keep_sensitive=config.keep_sensitive)
    return model


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every NF4 weight by its dense dequantized value (in place); returns ``model``."""
    for name, module in quantizable_layers(model):
        if isinstance(module.weight, NF4Tensor):
            module.weight = nn.Parameter(module.weight.dequantize(dtype).contiguous(), requires_grad=False)
    return model


@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, ...]
    quantized: bool
    bytes_before: int
    bytes_after: int
    reason: str = ""


@dataclass
class Summary:
    layers: list[LayerSummary]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def as_dict(self) -> dict:
        return {
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "quantized": sum(layer.quantized for layer in self.layers),
            "skipped": sum(not layer.quantized for layer in self.layers),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }

    def __str__(self) -> str:
        rows = [f"{'layer':40s} {'shape':>14s} {'before':>10s} {'after':>10s}  status"]
        for layer in self.layers:
            status = "NF4" if layer.quantized else f"kept dense: {layer.reason}"
            shape = "x".join(map(str, layer.shape))
            rows.append(f"{layer.name:40s} {shape:>14s} {layer.bytes_before:>10d} {layer.bytes_after:>10d}  {status}")
        nf4 = [layer for layer in self.layers if layer.quantized]
        nf4_before, nf4_after = sum(x.bytes_before for x in nf4), sum(x.bytes_after for x in nf4)
        rows.append(
            f"{len(nf4)} of {len(self.layers)} linear layers in NF4: "
            f"{nf4_before / 2**20:.2f} MiB -> {nf4_after / 2**20:.2f} MiB ({nf4_before / max(nf4_after, 1):.2f}x smaller); "
            f"all linear weights {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"
        )
        return "\n".join(rows)


def summary(model: nn.Module) -> Summary:
    """Per Linear/Conv1D layer: quantized or why not, and weight bytes before/after."""
    skipped = getattr(model, "_nf4compile_skipped", {})
    layers = []
    for name, module in quantizable_layers(model):
        weight = module.weight
        if isinstance(weight, NF4Tensor):
            before = weight.numel() * weight.element_size()
            layers.append(LayerSummary(name, tuple(weight.shape), True, before, weight.nbytes_quantized()))
        else:
            size = weight.numel() * weight.element_size()
            layers.append(LayerSummary(name, tuple(weight.shape), False, size, size, skipped.get(name, "not quantized")))
    return Summary(layers)


if register_quantize_module_handler is not None:

    @register_quantize_module_handler(NF4Config)
    def _torchao_handler(module: nn.Module, config: NF4Config, **kwargs) -> nn.Module:
        """torchao's ``quantize_(model, NF4Config())`` calls this once per module its filter_fn selects."""
        return quantize(module, config, show_progress=False)
