"""QLoRA training step: a Llama-2-7B-shaped model (random weights), LoRA r=16 on every linear layer.

    PYTHONPATH=. python bench/qlora.py [--gpu-budget-s 200] [--out bench/results]
    PYTHONPATH=. python bench/qlora.py --small --compile-backend eager      # CPU, tiny shapes (CI)

Methods, one at a time on the device, in one run:
  nf4compile        nf4compile.quantize + peft LoRA, compiled
  bf16-compiled     bf16 weights + peft LoRA, compiled
  bnb-eager         bitsandbytes Linear4bit (nf4, double quant, bf16 compute) + peft LoRA, eager, as users run it
  bnb-compiled      the same, compiled ("if that works": a failure is recorded, not fatal)
  nf4compile-eager  nf4compile + peft LoRA, eager (an anchor)
  nf4compile-graphs nf4compile + peft LoRA, compiled with mode="reduce-overhead" (CUDA-graph trees)
  bf16-graphs       bf16 weights + peft LoRA, the same mode: the like-for-like baseline of nf4compile-graphs
Same workload everywhere: every Linear but lm_head in the method's format; peft LoRA r=16, alpha=32, no
dropout, on q/k/v/o/gate/up/down (adapters in fp32, peft's default); sequence 512, batch 1 and 4; a step is
forward with labels (the loss), backward, AdamW step, zero_grad. No prepare_model_for_kbit_training (it
casts norms, embeddings and lm_head to fp32 and turns on checkpointing: another workload) and no gradient
checkpointing. The embedding output requires grad (``enable_input_require_grads``, as checkpointing
recipes do), so every decoder layer sees the same kind of input: compiled, the 32 layers share one graph.
"Compiled" is regional compilation: each decoder layer is ``torch.compile``d (one compile serves all 32;
embedding, final norm, lm_head and loss run eagerly), the same for every compiled method. The ``-graphs``
methods replay each layer's forward and backward as CUDA graphs: at batch 1 the compiled step is host-bound
(bench/profile_steps.py qlora: the GPU idles most of a step), and graphs take the per-kernel Python of the
compiled layers (the NF4 dequantize's included) off the step; on the CPU the mode changes nothing.

Measured: step time (CUDA events around each step, after --warmup steps, of which the first compiles;
median of --steps), the number of graphs compiled (1: the 32 layers share one), peak memory over all steps, warm-up
included (``max_memory_allocated``: weights, adapters, their gradients and AdamW state, activations; a CUDA-graph
method allocates its graphs' memory pool while recording them and nothing while replaying, so the timed steps
alone would miss it; ``max_memory_reserved`` beside it), weight memory (what building left allocated), the first warm-up
step's seconds (compile). Configurations run in order until --gpu-budget-s is spent; the JSON (and PNG) is
rewritten after each, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
from e2e import MODELS, SMALL_MODELS, build_bf16, cleanup, environment, evaluate_targets, plot_panels, sync, to_bnb, write_json  # noqa: E402

START = time.monotonic()
MODEL = "llama-2-7b"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Most important first: the budget cuts from the end. Each method builds one model for all its batches.
PLAN = ["nf4compile", "bf16-compiled", "nf4compile-graphs", "bf16-graphs", "bnb-eager", "bnb-compiled", "nf4compile-eager"]
CUDA_GRAPHS = {"nf4compile-graphs", "bf16-graphs"}
COMPILED = {"nf4compile", "bf16-compiled", "bnb-compiled", *CUDA_GRAPHS}
FULLGRAPH = {"nf4compile", "bf16-compiled", *CUDA_GRAPHS}  # bnb-compiled: "if that works", graph breaks allowed


def build(method: str, shapes: dict, device) -> nn.Module:
    import nf4compile
    from peft import LoraConfig, get_peft_model

    model = build_bf16(MODEL, shapes, device).train()
    model.config.use_cache = False  # training: no KV cache (it would hold every layer's keys and values)
    if method.startswith("nf4compile"):
        nf4compile.quantize(model)
    elif method.startswith("bnb"):
        to_bnb(model)
        model.is_loaded_in_4bit = True  # as transformers' loader marks it: peft then wraps with its bnb LoRA layer
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.enable_input_require_grads()
    return model


def compile_layers(model: nn.Module, method: str, backend: str) -> None:
    # CI's --small run traces with the "eager" backend, which takes no mode.
    mode = {"mode": "reduce-overhead"} if method in CUDA_GRAPHS and backend == "inductor" else {}
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=backend, fullgraph=method in FULLGRAPH, dynamic=False, **mode)  # each batch its own static graph


def training_step(model: nn.Module, ids: torch.Tensor):
    """The benchmark's step on ``ids``: forward with labels, backward, AdamW step, zero_grad; returns the loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph trees: last step's outputs are no longer read
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run_config(model, method: str, batch: int, args, device) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, args.seq), device=device)
    if method in CUDA_GRAPHS:
        # Each batch records its own graphs: the last batch's, and their memory pool, go first (as in a fresh
        # process), so that this batch's peak is its own.
        cleanup(device)
    step = training_step(model, ids)
    graphs_before = counters["stats"]["unique_graphs"]
    losses, warmup_s = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        start = time.perf_counter()
        losses.append(step())
        sync(device)
        warmup_s.append(time.perf_counter() - start)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)]
        for begin, end in events:
            begin.record()
            losses.append(step())
            end.record()
        sync(device)
        step_ms = [begin.elapsed_time(end) for begin, end in events]
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
        peak_reserved_gb = torch.cuda.max_memory_reserved() / 1e9
    else:
        step_ms = []
        for _ in range(args.steps):
            start = time.perf_counter()
            losses.append(step())
            step_ms.append((time.perf_counter() - start) * 1e3)
        peak_gb = peak_reserved_gb = None
    losses = [float(loss) for loss in losses]
    if not all(map(math.isfinite, losses)):
        raise FloatingPointError(f"non-finite loss: {losses}")
    return dict(step_ms=statistics.median(step_ms), step_ms_all=step_ms, peak_gb=peak_gb,
                peak_reserved_gb=peak_reserved_gb, compile_s=warmup_s[0],
                graphs=counters["stats"]["unique_graphs"] - graphs_before,  # compiled: 1 (each a forward and a backward)
                tokens_per_s=batch * args.seq / (statistics.median(step_ms) / 1e3), loss_first=losses[0], loss_last=losses[-1])


def estimate_s(method: str, finished: dict[str, float]) -> float:
    """Seconds a method should take (a build, then per batch a compile and the steps), from the methods that
    finished (``finished``: method -> seconds); 0 for the first of its kind (it runs while any budget is left)."""
    alike = [s for m, s in finished.items() if (m in COMPILED) == (method in COMPILED)]
    return 1.2 * max(alike) if alike else 0.0


# --- output ----------------------------------------------------------------------------------------


def method_targets(method: str, baseline: str) -> list:
    """The issue's three targets for ``method``: peak memory and speedup against bitsandbytes eager, step time
    against ``baseline`` (bf16 + LoRA compiled the same way). (name, metric, threshold, higher is better);
    r[batch, method] is a finished configuration."""
    return [
        *[(f"peak GB {method} / bnb-eager, batch {b}",
           lambda r, b=b: r[b, method]["peak_gb"] / r[b, "bnb-eager"]["peak_gb"], 1.0, False) for b in (1, 4)],
        *[(f"{method} speedup over bnb-eager, batch {b}",
           lambda r, b=b: r[b, "bnb-eager"]["step_ms"] / r[b, method]["step_ms"], 1.5, True) for b in (1, 4)],
        *[(f"{method} step time / {baseline}'s, batch {b}",
           lambda r, b=b: r[b, method]["step_ms"] / r[b, baseline]["step_ms"], 1.25, False) for b in (1, 4)],
    ]


TARGETS = [*method_targets("nf4compile", "bf16-compiled"), *method_targets("nf4compile-graphs", "bf16-graphs")]


def targets(results: list) -> list:
    return evaluate_targets(TARGETS, {(r["batch"], r["method"]): r for r in results if r["status"] == "ok"})


def plot(json_path: Path) -> Path | None:
    """Step time and peak memory per configuration, as a PNG beside the JSON."""
    colors = {"nf4compile": "tab:green", "nf4compile-eager": "tab:olive", "bf16-compiled": "tab:gray",
              "nf4compile-graphs": "tab:red", "bf16-graphs": "tab:brown",
              "bnb-eager": "tab:blue", "bnb-compiled": "tab:cyan"}
    return plot_panels(
        json_path, [("step_ms", "training step ms (median)"), ("peak_gb", "peak GPU memory GB (weights hatched)")],
        label=lambda r: f"{r['method']}\nbatch {r['batch']}", color=lambda r: colors.get(r["method"], "tab:purple"),
        title="QLoRA step, {device}: Llama-2-7B shape, sequence {seq}, LoRA r=16",
    )


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--gpu-budget-s", type=float, default=240.0,
                        help="start no method whose estimated time exceeds what is left (from process start)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ", ".join(PLAN))
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps; the first compiles")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU, 1 warm-up and 2 timed steps (CI)")
    parser.add_argument("--device", default=None, help="default: cuda when available, cpu with --small")
    parser.add_argument("--compile-backend", default="inductor", help="CI's --small run uses 'eager' (tracing only)")
    args = parser.parse_args(argv)
    if args.small:
        args.seq, args.warmup, args.steps = min(args.seq, 32), 1, min(args.steps, 2)
    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    shapes = SMALL_MODELS if args.small else MODELS
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",") if args.methods else PLAN

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"qlora-{'small' if args.small else device.type}-{stamp}.json"
    env = {**environment(device), "peft": importlib.metadata.version("peft"), "date": stamp}
    report = dict(environment=env, args={k: str(v) for k, v in vars(args).items()}, shapes=shapes[MODEL], results=[])
    report["args"]["seq"] = args.seq
    print(f"qlora: {methods} x batch {batches} on {env['device']}; writing {path}", flush=True)
    write_json(path, report, targets)
    finished: dict[str, float] = {}
    for method in [m for m in PLAN if m in methods]:
        method_start = time.monotonic()
        left = args.gpu_budget_s - (method_start - START)
        if estimate_s(method, finished) > left:
            report["results"] += [dict(method=method, batch=b, status="skipped", reason=f"budget: {left:.0f} s left") for b in batches]
            write_json(path, report, targets)
            continue
        model = None
        try:
            cleanup(device)
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            model = build(method, shapes, device)
            weight_gb = (torch.cuda.memory_allocated() - before) / 1e9 if device.type == "cuda" else None
            if method in COMPILED:
                compile_layers(model, method, args.compile_backend)
            built = None
        except Exception as e:  # noqa: BLE001  one failing method must not lose the others' results
            built = f"{type(e).__name__}: {e}"[:2000], traceback.format_exc()[-4000:]
        for batch in batches:
            config_start = time.monotonic()
            entry = dict(method=method, batch=batch)
            left = args.gpu_budget_s - (config_start - START)
            last = report["results"][-1] if report["results"] else {}
            if last.get("method") == method and 1.3 * last["elapsed_config_s"] > left:  # a larger batch: a recompile, longer steps
                entry.update(status="skipped", reason=f"budget: {left:.0f} s left")
            elif built is not None:
                entry.update(status="error", error=built[0], trace=built[1])
            else:
                try:
                    entry.update(run_config(model, method, batch, args, device), status="ok", weight_gb=weight_gb)
                except Exception as e:  # noqa: BLE001
                    entry.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-4000:])
            entry.update(elapsed_config_s=time.monotonic() - config_start, elapsed_s=time.monotonic() - START)
            report["results"].append(entry)
            write_json(path, report, targets)
            plot(path)
            print(json.dumps({k: v for k, v in entry.items() if k not in ("trace", "step_ms_all")}), flush=True)
        del model
        gc.collect()
        finished[method] = time.monotonic() - method_start
    cleanup(device)
    for row in report["targets"]:
        print(f"target: {row['target']}: {row['value']} (threshold {row['threshold']}) met={row['met']}")
    print(f"wrote {path}", flush=True)
    return report


if __name__ == "__main__":
    main()
