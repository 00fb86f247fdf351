"""Calibrated NF4: better weights in the same bitsandbytes format.

The format fixes only ``weight ≈ code * scale`` per block; it does not say that the scale is the
block's absmax or that each code is the nearest one. Three ways to use that freedom:

- scale search: per block, the scale (a fraction of absmax) with the smallest reconstruction error,
  weighted by the input energy of each column when calibration data is given;
- GPTQ on the NF4 grid: round column by column and push each column's error onto the columns not
  yet rounded, through the Cholesky factor of the inverse of H = XᵀX (the layer's input second
  moment on the calibration data), so the layer's *output* error is small rather than the weights';
- sensitivity: keep the layers whose NF4 error moves the model output most in their original
  dtype, within a byte budget.

Everything here computes weights; ``nf4compile.quantize`` swaps them in only when all succeeded.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterable, Optional

import torch
from torch import Tensor, nn

from nf4compile import format as nf4_format
from nf4compile.policy import is_conv1d
from nf4compile.tensor import NF4Tensor

if TYPE_CHECKING:
    from nf4compile.quantize import NF4Config

# Candidate scales as fractions of absmax, tried after absmax itself; one replaces the current best
# only when strictly better, so the search never does worse than plain NF4. (Finer grids gain <0.3%.)
SHRINK_FACTORS = tuple(1.0 - 0.02 * i for i in range(1, 26))  # 0.98 ... 0.50
# Added to H's diagonal, as a fraction of its mean. Larger than GPTQ's usual 0.01: calibration sets
# are often a few hundred tokens, fewer than in_features, so H is rank deficient and trusting it
# fully overfits them. Tuned on a 2-fold split of the MiniLM calibration sentences (quantize on 12,
# score on the other 12; the held-out sentences never seen), GPTQ + search, bf16, mean cosine:
# 0.01 -> 0.9803, 0.03 -> 0.9830, 0.1 -> 0.9855, 0.2 -> 0.9860, 0.3 -> 0.9867, 0.5 -> 0.9863, 1 -> 0.9860.
GPTQ_DAMP = 0.3
GPTQ_GROUP = 128  # columns updated eagerly; the rest of the matrix once per group (fewer, larger matmuls)


# --- scale search -----------------------------------------------------------------------------


def search_scales(weight: Tensor, block_size: int, hessian: Optional[Tensor] = None) -> Tensor:
    """Per-block scale (fp32, ≤ absmax) minimizing the block's error e = w - dequant(w).

    Without data the error is ‖e‖². With the inputs' second moment H (damped as for GPTQ) it is the
    block's share of the layer's output error, e H_bb eᵀ with H_bb the block of H for the block's
    columns, when blocks are row-aligned; otherwise (blocks span rows) Σ diag(H) · e².
    """
    out_features, in_features = weight.shape
    blocks = nf4_format._blocks(weight.reshape(-1).float(), block_size)
    if hessian is None:

        def error_of(e: Tensor) -> Tensor:
            return e.square().sum(dim=1)

    elif in_features % block_size:
        diagonal = nf4_format._blocks(hessian.diagonal().float().expand(out_features, -1).reshape(-1), block_size)

        def error_of(e: Tensor) -> Tensor:
            return (diagonal * e.square()).sum(dim=1)

    else:
        n = in_features // block_size
        h_blocks = hessian.float().view(n, block_size, n, block_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        h_blocks = h_blocks + GPTQ_DAMP * hessian.diagonal().mean() * torch.eye(block_size, device=h_blocks.device)

        def error_of(e: Tensor) -> Tensor:
            e = e.view(out_features, n, block_size).transpose(0, 1)  # [n, out, block]: one bmm per column block
            return (torch.bmm(e, h_blocks) * e).sum(dim=2).transpose(0, 1).reshape(-1)

    codebook = nf4_format.NF4_CODEBOOK.to(blocks.device)

    def block_error(scale: Tensor) -> Tensor:
        codes = nf4_format.nearest_codes(blocks, scale[:, None]).long()
        return error_of(blocks - codebook[codes] * scale[:, None])

    absmax = blocks.abs().amax(dim=1)
    best_scale, best_error = absmax, block_error(absmax)
    for factor in SHRINK_FACTORS:
        scale = absmax * factor
        error = block_error(scale)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


# --- GPTQ on the NF4 grid ---------------------------------------------------------------------


def gptq_codes(weight: Tensor, hessian: Tensor, scales: Tensor, block_size: int) -> Tensor:
    """NF4 codes [out, in] (uint8) of ``weight`` for fixed per-block ``scales``, GPTQ-style: minimizes
    the output error ‖(W - Q) X‖² = tr((W - Q) H (W - Q)ᵀ) greedily, one column at a time.

    Blocks must be row-aligned (in % block_size == 0) so that every column has one scale per row.
    """
    out_features, in_features = weight.shape
    h = hessian.float().clone()
    # An input that was always zero carries no information: give it a unit diagonal so the
    # factorization works; its column is then rounded to nearest without moving the others.
    h.diagonal()[h.diagonal() == 0] = 1.0
    # Columns with the most input energy first ("act order"), while many columns are left to absorb
    # their error. The scales are fixed in advance, so any order keeps one scale per block.
    order = torch.argsort(h.diagonal(), descending=True)
    w = weight.float()[:, order].contiguous()
    h = h[order][:, order]
    u = _inverse_cholesky_upper(h)
    block_of = order // block_size
    scales = scales.float().reshape(out_features, in_features // block_size)
    codebook = nf4_format.NF4_CODEBOOK.to(w.device)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    for start in range(0, in_features, GPTQ_GROUP):
        end = min(start + GPTQ_GROUP, in_features)
        group = w[:, start:end].clone()
        errors = torch.empty_like(group)
        u_group = u[start:end, start:end]
        for i in range(end - start):
            scale = scales[:, block_of[start + i]]
            code = nf4_format.nearest_codes(group[:, i], scale)
            codes[:, start + i] = code
            error = (group[:, i] - codebook[code.long()] * scale) / u_group[i, i]
            group[:, i:] -= error[:, None] * u_group[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return codes[:, torch.argsort(order)]


def _inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor of the damped H⁻¹; more damping if H is numerically not positive definite."""
    damp = GPTQ_DAMP * h.diagonal().mean()
    for _ in range(5):
        factor, info = torch.linalg.cholesky_ex(h + damp * torch.eye(len(h), device=h.device))
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        damp *= 10
    raise ValueError("the calibration inputs' second moment XᵀX is not positive definite even when damped")


# --- calibration data -------------------------------------------------------------------------

# Chosen on all-MiniLM-L6-v2, scale search scored on its calibration sentences (which random tokens
# never see; the held-out sentences were not used), mean cosine vs fp32, bf16: weight error alone
# 0.9777; random tokens 8x128 0.9780, 16x64 0.9784, 64x16 0.9796, 32x32 0.9803 (seeds 1, 2: 0.9793,
# 0.9794). Short sequences, as the model is used; more than the length, the count hardly matters.
RANDOM_TOKEN_COUNT, RANDOM_TOKEN_LENGTH = 32, 32


def random_tokens(vocab_size: int, count: int = RANDOM_TOKEN_COUNT, length: int = RANDOM_TOKEN_LENGTH, seed: int = 0) -> list[Tensor]:
    """Calibration batches for a language model without any text: ``count`` tensors [1, length] of
    token ids drawn uniformly from ``range(vocab_size)``.

    What data buys scale search is mostly the layers' input statistics (which channels carry the
    energy: norm weights, outlier features), and the model shows those on random tokens too: on
    MiniLM they recover most of what real sentences give (see RANDOM_TOKEN_COUNT).
    """
    for what, value in (("vocab_size", vocab_size), ("count", count), ("length", length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"random_tokens: {what} must be a positive int, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (1, length), generator=generator) for _ in range(count)]



def run_batch(model: nn.Module, batch, parameters: Optional[dict[str, Tensor]] = None):
    """Call ``model`` on one calibration batch (a tensor, a tuple of positional inputs or a dict of
    keyword inputs), with ``parameters`` substituted for the model's own when given."""
    args, kwargs = ((), batch) if isinstance(batch, dict) else ((batch if isinstance(batch, (tuple, list)) else (batch,)), {})
    if parameters:
        return torch.func.functional_call(model, parameters, tuple(args), kwargs)
    return model(*args, **kwargs)


def first_tensor(output) -> Tensor:
    """The main output: a tensor itself, or the first tensor of a tuple/dict (logits, last hidden state)."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"nf4compile: cannot find a tensor in the model output ({type(output).__name__})")


@contextlib.contextmanager
def inference(model: nn.Module):
    """eval() and no_grad() for the calibration passes (dropout would make every measure noisy);
    each module's training flag is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def collect_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: list) -> dict[str, Tensor]:
    """H = XᵀX / n (fp32, [in, in]) of every layer's input over the calibration batches.

    Hooks on the original model: memory is one H per layer whatever the amount of data.
    """
    hessians: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                counts[name] = 0
            hessians[name].addmm_(x.T, x)
            counts[name] += x.shape[0]

        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        with inference(model):
            for batch in batches:
                run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(layers) - set(hessians))
    if missing:
        raise ValueError(f"the calibration batches never reach {missing[:5]}: no input statistics for them")
    return {name: h / counts[name] for name, h in hessians.items()}


# --- the calibrated quantizer -----------------------------------------------------------------


class Calibrator:
    """Computes calibrated NF4 weights for ``nf4compile.quantize`` and picks the layers to keep dense.

    Construction checks the config against the layers and collects the input statistics (one pass
    over the calibration data on the unmodified model).
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], config: NF4Config, calibration: Optional[Iterable]):
        self.config = config
        self.batches = [] if calibration is None else list(calibration)
        needs_data = {"method='gptq'": config.method == "gptq", "keep_budget": config.keep_budget > 0}
        for what, needed in needs_data.items():
            if needed and not self.batches:
                raise ValueError(f"NF4Config({what}) needs calibration data: quantize(model, config, calibration=batches)")
        if config.method == "gptq":
            for name, module in layers.items():
                in_features = module.weight.shape[0 if is_conv1d(module) else 1]
                if in_features % config.block_size:
                    raise ValueError(
                        f"{name}: GPTQ needs blocks aligned to rows, but in_features={in_features} is not a "
                        f"multiple of block_size={config.block_size} (choose a block size that divides it, or skip the layer)"
                    )
        self.hessians = collect_hessians(model, layers, self.batches) if self.batches else {}
        # With method="gptq" and keep_budget: each layer rounded to nearest under the same scales.
        self.nearest: dict[str, NF4Tensor] = {}

    def to_nf4(self, name: str, weight: Tensor) -> NF4Tensor:
        """The calibrated NF4Tensor of ``weight`` [out, in] (the layer ``name``'s, Conv1D already transposed)."""
        config, block_size = self.config, self.config.block_size
        hessian = self.hessians.get(name)
        device = torch.device("cuda") if torch.cuda.is_available() else weight.device  # GPU when present
        w = weight.detach().to(device, torch.float32)
        if hessian is not None:
            hessian = hessian.to(device)
        if config.scale_search:
            scales = search_scales(w, block_size, hessian)
        else:
            scales = nf4_format._blocks(w.reshape(-1), block_size).abs().amax(dim=1)
        stored, nested_absmax, offset = scales, None, None
        if config.double_quant:  # the codes must be chosen for the scales bitsandbytes will reconstruct
            stored, nested_absmax, offset = nf4_format.double_quantize(scales)
            scales = nf4_format.dequantize_absmax(stored, nested_absmax, offset)
        target = weight.device

        def nf4_of(packed: Tensor) -> NF4Tensor:
            return NF4Tensor(
                packed.to(target), stored.to(target), block_size, weight.shape, weight.dtype, False,
                None if nested_absmax is None else nested_absmax.to(target), None if offset is None else offset.to(target),
            )

        if config.method == "nearest":
            return nf4_of(nf4_format.quantize_nf4_with_scales(w, scales, block_size))
        if config.keep_budget:  # what keep_dense measures sensitivity with
            self.nearest[name] = nf4_of(nf4_format.quantize_nf4_with_scales(w, scales, block_size))
        return nf4_of(nf4_format.pack_codes(gptq_codes(w, hessian, scales, block_size).reshape(-1)))

    def keep_dense(self, model: nn.Module, staged: dict[str, NF4Tensor]) -> dict[str, str]:
        """{layer: reason} of the layers to keep in their original dtype, within keep_budget × the
        bytes of all ``staged`` NF4 weights (layer name -> the NF4 weight as the module will hold it).

        A layer's gain is how much the model output on the calibration data moves back towards the
        original when that layer alone is restored in the otherwise all-NF4 model. Layers are taken
        by gain per extra byte, a greedy knapsack: a few small layers often beat one large one.

        With GPTQ the gains are measured with the layers rounded to nearest (same scales), not with
        the GPTQ codes: GPTQ fits the calibration data, so its error there understates its error on
        new data, most for the layers it overfits, which then looked insensitive. (MiniLM, 2-fold
        split of the calibration sentences, keep_budget=0.15: held-out-of-fold cosine 0.9890 with the
        GPTQ codes as probe, 0.9912 with nearest rounding; layer 5's attention output, the most
        valuable layer to keep, was never chosen with the GPTQ codes.)
        """
        budget = self.config.keep_budget * sum(w.nbytes_quantized() for w in staged.values())
        probes = {}
        for name, weight in staged.items():
            probe = self.nearest.get(name)
            probes[f"{name}.weight"] = weight if probe is None else probe.t() if weight.transposed else probe
        dense = _dequantized_within(probes)
        with inference(model):
            reference = [first_tensor(run_batch(model, batch)).float() for batch in self.batches]
            energy = sum(r.square().sum() for r in reference)

            def output_error(parameters: dict[str, Tensor]) -> float:
                error = sum(
                    (first_tensor(run_batch(model, batch, parameters)).float() - r).square().sum()
                    for batch, r in zip(self.batches, reference)
                )
                return (error / energy).item()

            base = output_error(dense)
            # Leaving a layer's key out runs the module's own (original) weight.
            gain = {name: base - output_error({k: v for k, v in dense.items() if k != f"{name}.weight"}) for name in staged}
        del dense, probes
        extra = {name: w.numel() * w.element_size() - w.nbytes_quantized() for name, w in staged.items()}
        rounding = "nearest-rounded " if self.nearest else ""
        kept, spent = {}, 0
        for name in sorted(staged, key=lambda n: gain[n] / extra[n], reverse=True):
            if gain[name] > 0 and spent + extra[name] <= budget:
                spent += extra[name]
                kept[name] = (
                    f"sensitive: kept dense, the output error on the calibration data of the {rounding}NF4 model "
                    f"drops from {base:.2e} to {base - gain[name]:.2e} with this layer alone dense "
                    f"(keep_budget={self.config.keep_budget})"
                )
        return kept


def spare_bytes(device: torch.device) -> int:
    """Memory that dense copies of probe weights may take on ``device``: half of what is free now
    (0 where that cannot be known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # no such sysconf name (not Linux)
        return 0


def _dequantized_within(probes: dict[str, NF4Tensor]) -> dict[str, Tensor]:
    """``probes`` with as many as fit in ``spare_bytes(device)`` replaced by their dense copies.

    With every probe dense each sensitivity pass is a plain forward instead of one dequantization
    per layer per batch (12x faster on MiniLM on the CPU), but the copies are as large as the
    quantized layers' original weights (13 GB for a 7B model in bf16): the rest stay NF4 and are
    dequantized in each forward, same values, slower.
    """
    left: dict[torch.device, int] = {}
    tensors: dict[str, Tensor] = {}
    for key, probe in probes.items():
        device, nbytes = probe.device, probe.numel() * probe.element_size()
        if device not in left:
            left[device] = spare_bytes(device)
        if nbytes <= left[device]:
            left[device] -= nbytes
            tensors[key] = probe.dequantize()
        else:
            tensors[key] = probe
    return tensors
