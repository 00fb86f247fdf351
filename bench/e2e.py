"""End to end: prefill and decode of Llama-2-7B / Llama-3-8B shapes (random weights), every method side by side.

    PYTHONPATH=. python bench/e2e.py [--gpu-budget-s 420] [--out bench/results] [--small]
    PYTHONPATH=. python bench/e2e.py --plot bench/results/<file>.json      # PNG from a JSON (e.g. on a laptop)

Methods: bf16 compiled; nf4compile compiled (fused, sibling linears grouped at decode); nf4compile compiled
ungrouped (GroupSiblingLinears off); nf4compile compiled unfused (the Inductor pass off);
bitsandbytes NF4 (nf4, double quant, bf16 compute; Linear4bit modules as transformers' loader installs
them) eager, and compiled; torchao NF4 compiled; bf16 eager as an anchor. Configurations run in priority
order (PLAN) until --gpu-budget-s is spent; the JSON is rewritten after each one, so a run cut short still
leaves every finished result, and a configuration that fails is recorded with its error.

Per configuration: prefill ms (the prompt through the model, eagerly: like transformers' generate with a
compile_config, only the one-token decode step is compiled), decode tokens/s per sequence (N-1 decode
steps after a warm-up run; x batch for the total), peak GPU memory (this model's weights + KV cache +
activations + CUDA-graph pools), weight memory (what building the model left allocated; GB = 1e9 bytes)
and compile time (the warm-up generate: decode-step compile, CUDA-graph recording, one prefill). Compiles are cold:
the run caches into a fresh temporary directory (Inductor, AOTAutograd, Triton) unless --warm-caches; each compiled
configuration records the cache hits it had (``compile_cache_hits``), and the compile-time target compares only
configurations that had none.

The compiled-generation recipe (README "Compiled generation"): eager prefill allocates the static KV
cache outside any CUDA graph; only ``decode_step`` is compiled; the returned token is cloned before the
next replay overwrites it; one cache per configuration, ``reset()`` between runs (same addresses, no
re-recording). On a GPU the compiled step (``mode="default"``) is captured whole into one CUDA graph
(``CapturedStep``, recipe 4): replaying it skips Dynamo's guards and AOTAutograd's per-call unwrapping
of every NF4 parameter, which cost ~24 us per NF4 weight per step on the H100 (5 ms per token for a 7B
model, more than its kernels) under ``mode="reduce-overhead"``. ``--decode-graph trees`` uses
``mode="reduce-overhead"`` (CUDA-graph trees) instead; the ``nf4compile-trees`` method always does.

--small: tiny shapes on the CPU (what CI runs so this script cannot rot); with --device cuda a GPU smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import functools
import gc
import importlib.util
import inspect
import json
import os
import platform
import pstats
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
import transformers
from torch import nn
from torch._inductor.utils import run_and_get_code

START = time.monotonic()
# The keyword transformers' forward and generate take the KV cache by: ``cache`` since it was renamed (5.25 here:
# ``past_key_values`` warns there and goes in 5.40), ``past_key_values`` before (5.17 on the GPU machine).
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"

MODELS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}
SMALL_MODELS = {  # same structure (MHA vs GQA), CPU-sized; every weight a multiple of 64 x 256 (torchao's NF4)
    "llama-2-7b": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256),
    "llama-3-8b": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, vocab_size=4000, max_position_embeddings=256, rope_theta=500000.0),
}
# (model, batch, method), most important first: the budget cuts from the end.
# nf4compile before bf16: if only one compile fits, its absolute numbers (tok/s, GB) still answer the targets.
PLAN = [
    ("llama-2-7b", 1, "nf4compile"),
    ("llama-2-7b", 1, "bf16-compiled"),
    ("llama-2-7b", 8, "nf4compile"),
    ("llama-2-7b", 8, "bf16-compiled"),
    ("llama-2-7b", 1, "bnb-eager"),
    ("llama-2-7b", 8, "bnb-eager"),
    ("llama-2-7b", 1, "nf4compile-ungrouped"),
    ("llama-2-7b", 1, "nf4compile-unfused"),
    ("llama-2-7b", 1, "bf16-eager"),  # seconds: the bf16 model is still built
    ("llama-3-8b", 1, "nf4compile"),
    ("llama-3-8b", 1, "bf16-compiled"),
    ("llama-2-7b", 1, "torchao-compiled"),
    ("llama-2-7b", 1, "bnb-compiled"),
    ("llama-3-8b", 8, "nf4compile"),
    ("llama-3-8b", 8, "bf16-compiled"),
    ("llama-2-7b", 8, "nf4compile-unfused"),
    ("llama-2-7b", 1, "nf4compile-trees"),
    ("llama-2-7b", 8, "nf4compile-ungrouped"),
]
COMPILED = {"bf16-compiled", "nf4compile", "nf4compile-ungrouped", "nf4compile-unfused", "nf4compile-trees", "bnb-compiled",
            "torchao-compiled"}
FULLGRAPH = {"bf16-compiled", "nf4compile", "nf4compile-ungrouped", "nf4compile-unfused", "nf4compile-trees"}  # the others: compiled "if that works"
WARMUP_TOKENS = 3  # the decode step runs twice: CUDA-graph trees warm up, then record
PREFILL_REPEATS = 3


# --- generation (the recipe) ------------------------------------------------------------------------


def decode_step(model, cache, token, position):
    """One token in, the next greedy token out: the only compiled function."""
    logits = model(input_ids=token, position_ids=position, use_cache=True, **{CACHE: cache}).logits
    return logits[:, -1].argmax(-1, keepdim=True)


class CapturedStep:
    """A compiled decode step replayed as one CUDA graph (recipe 4).

    Captured on the first call, after two warm-up calls on a side stream (compilation, Triton JIT and
    autotuning happen there, never inside the capture; ``warm_up_step`` undoes their cache writes). Later
    calls copy ``token`` and ``position`` into the graph's input buffers and replay; the model and cache
    must be the ones it was captured with (the cache reset in place, never reallocated), and the batch
    size the same. The returned token is the graph's output buffer: clone it before the next call.
    """

    def __init__(self, step):
        self.step = step
        self.graph = None

    def __call__(self, model, cache, token, position):
        if self.graph is None:
            self.inputs = (token.clone(), position.clone())
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                warm_up_step(self.step, model, cache, *self.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.step(model, cache, *self.inputs)
        self.inputs[0].copy_(token)
        self.inputs[1].copy_(position)
        self.graph.replay()
        return self.output


def warm_up_step(step, model, cache, token, position, calls: int = 2) -> None:
    """Calls the decode step ``calls`` times (compiling it, JIT-compiling and tuning its kernels), then puts the
    cache's fill counters back: a transformers 5 StaticCache writes each call's keys and values at the slot
    its own counter says (``cumulative_length``, advanced in place), whatever ``position`` is, so without
    this the next real token would be written ``calls`` slots late and every later query would attend to
    the warm-up's copies instead of its own and its predecessors' keys. The slots the warm-ups wrote lie
    beyond the counter: masked until real tokens overwrite them."""
    layers = list(getattr(cache, "layers", ()))
    tensors = [(t, t.clone()) for layer in layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool]
    numbers = [(layer, name, value) for layer in layers for name, value in vars(layer).items()
               if type(value) is int]
    for _ in range(calls):
        step(model, cache, token, position)
    for counter, saved in tensors:
        counter.copy_(saved)
    for layer, name, value in numbers:
        setattr(layer, name, value)


def new_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def generate(model, prompt, new_tokens: int, step=decode_step, cache=None, timings: dict | None = None):
    """Greedy decoding with a static KV cache: eager prefill, then ``step`` per token. Returns prompt + new tokens.

    ``timings`` (if given) receives prefill_s and decode_s, measured with device syncs around each phase.
    """
    batch, length = prompt.shape
    device = prompt.device
    if cache is None:
        cache = new_cache(model, length + new_tokens)
    else:
        cache.reset()
    # Positions made before the loop: a host->device copy inside it would wait for the previous step.
    positions = [torch.tensor([[length + i]], device=device) for i in range(new_tokens - 1)]
    sync(device)
    start = time.perf_counter()
    logits = model(input_ids=prompt, position_ids=torch.arange(length, device=device)[None],
                   use_cache=True, logits_to_keep=1, **{CACHE: cache}).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill_end = time.perf_counter()
    tokens = [token]
    for position in positions:
        torch.compiler.cudagraph_mark_step_begin()
        token = step(model, cache, token, position).clone()  # the graph's output buffer is reused next step
        tokens.append(token)
    sync(device)
    if timings is not None:
        timings.update(prefill_s=prefill_end - start, decode_s=time.perf_counter() - prefill_end)
    return torch.cat([prompt, *tokens], dim=1)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- models ----------------------------------------------------------------------------------------


def build_bf16(name: str, shapes: dict, device) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**shapes[name], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):  # random init on the GPU: seconds for 7B, not minutes on the CPU
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def to_bnb(model: nn.Module) -> nn.Module:
    """Every Linear but lm_head becomes bitsandbytes Linear4bit (nf4, double quant, bf16 compute), quantized
    by Params4bit.to(device) as transformers' bitsandbytes loader does."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")
                weight = child.weight.detach()
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", blocksize=64, module=layer).to(weight.device)
                if child.bias is not None:
                    layer.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, child_name, layer)
    return model


def to_torchao(model: nn.Module) -> nn.Module:
    try:
        from torchao.quantization import to_nf4  # torchao >= 0.15
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            module.weight = nn.Parameter(to_nf4(module.weight.detach(), 64, 256), requires_grad=False)
    return model


def build(name: str, method: str, shapes: dict, device) -> nn.Module:
    import nf4compile

    model = build_bf16(name, shapes, device)
    if method.startswith("nf4compile"):
        nf4compile.quantize(model)  # fused or not is decided per compile (run_config)
    elif method.startswith("bnb"):
        to_bnb(model)
    elif method.startswith("torchao"):
        to_torchao(model)
    return model


def model_family(method: str) -> str:
    """Methods that share one built model (fusion is decided per compile, not per model)."""
    return method.split("-")[0]


# --- one configuration -----------------------------------------------------------------------------


def run_config(model, method: str, batch: int, args, device) -> dict:
    vocab = model.config.vocab_size
    torch.manual_seed(1)
    prompt = torch.randint(3, vocab, (batch, args.prompt), device=device)
    new_tokens = args.new_tokens if method in COMPILED else args.eager_new_tokens
    step = decode_step
    if method in COMPILED:
        trees = method.endswith("-trees") or args.decode_graph == "trees"
        cuda_graphs = device.type == "cuda" and args.compile_backend == "inductor"
        mode = "reduce-overhead" if cuda_graphs and trees else None
        step = torch.compile(decode_step, backend=args.compile_backend, mode=mode, fullgraph=method in FULLGRAPH)
        if cuda_graphs and not trees:
            step = CapturedStep(step)
    cache = new_cache(model, args.prompt + new_tokens)
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # Unfused: the Inductor pass leaves dequantize + matmul alone; ungrouped: sibling linears (q, k, v;
    # gate, up) are not grouped into one launch. For this compile only.
    switches = {"nf4compile-unfused": {"NF4COMPILE_FUSE": "0"}, "nf4compile-ungrouped": {"NF4COMPILE_GROUP": "0"}}
    hits_before = compile_cache_hits()
    with torch.no_grad(), mock.patch.dict(os.environ, switches.get(method, {})):
        warmup: dict = {}
        warm_up = functools.partial(run_and_get_code, generate, model, prompt, WARMUP_TOKENS, step, cache, warmup)
        if args.profile_compile and method in COMPILED:
            (_, code), profile = profiled(warm_up, args.profile_compile)
        else:
            (_, code), profile = warm_up(), None
        warmup_s = time.perf_counter() - start
        prefill_s = []
        for _ in range(PREFILL_REPEATS):
            timings: dict = {}
            generate(model, prompt, 1, step, cache, timings)
            prefill_s.append(timings["prefill_s"])
        out = generate(model, prompt, new_tokens, step, cache, timings)
    assert out.shape == (batch, args.prompt + new_tokens)
    result = dict(
        new_tokens=new_tokens,
        prefill_ms=sorted(prefill_s)[len(prefill_s) // 2] * 1e3,
        decode_tok_s=(new_tokens - 1) / timings["decode_s"],
        decode_tok_s_total=batch * (new_tokens - 1) / timings["decode_s"],
        compile_s=warmup_s if method in COMPILED else None,
    )
    if method in COMPILED:  # where the warm-up went; the rest is the compiled step's first runs and graph capture
        result.update(compile_prefill_s=warmup["prefill_s"], compile_phases_s=compile_phases(),
                      compile_cache_hits=compile_cache_hits() - hits_before)
    if profile:
        result["compile_profile"] = profile
    if code:  # Inductor's output: did the pass fuse (nf4compile: every NF4 layer one linear, no dequantize)?
        result.update(decode_graph="trees" if method.endswith("-trees") or args.decode_graph == "trees" else "step",
                      fused_linear_calls=sum(c.count("torch.ops.nf4compile.linear.default(") for c in code),
                      linear_group_calls=sum(c.count("torch.ops.nf4compile.linear_group.default(") for c in code),
                      dequantize_calls=sum(c.count("torch.ops.nf4compile.dequantize.default(") for c in code))
    if device.type == "cuda":
        result["peak_gb"] = (torch.cuda.max_memory_allocated() - baseline + model._bench_weight_bytes) / 1e9
    return result


# Dynamo's timers (reset by torch._dynamo.reset in cleanup): tracing + backend, Inductor's lowering, our and
# Inductor's passes, and the wait for Inductor's parallel Triton builds. Our kernels build at their first run.
COMPILE_PHASES = ("_compile.compile_inner", "OutputGraph.call_user_compiler", "_recursive_post_grad_passes",
                  "GraphLowering.codegen", "async_compile.wait")


def compile_phases() -> dict:
    names, seconds = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    measured = dict(zip(names, seconds))
    return {name: float(measured[name]) for name in COMPILE_PHASES if name in measured}


def profiled(call, top: int):
    """``call()`` under cProfile (which slows Python ~2x: its compile_s is not comparable) -> its value, and where its
    time went: the ``top`` functions by cumulative seconds, Triton's compiler (our kernels build at their first run,
    outside Dynamo's timers) and nf4compile's own functions (tracing the NF4 subclass, fake ops, passes)."""
    profile = cProfile.Profile()
    value = profile.runcall(call)
    stats = pstats.Stats(profile).stats  # {(file, line, function): (primitive calls, calls, tottime, cumtime, callers)}
    ranked = sorted(stats.items(), key=lambda item: -item[1][3])
    return value, dict(
        triton_compile_s=sum(v[3] for k, v in stats.items() if k[0].endswith("triton/compiler/compiler.py") and k[2] == "compile"),
        nf4compile_self_s=sum(v[2] for k, v in stats.items() if f"{os.sep}nf4compile{os.sep}" in k[0]),
        top=[dict(function=f"{k[0]}:{k[1]}({k[2]})", calls=v[1], cum_s=round(v[3], 3), self_s=round(v[2], 3))
             for k, v in ranked[:top]],
    )


def compile_cache_hits() -> int:
    """AOTAutograd's and Inductor's cache hits so far in this process: graphs compiled before, by this process or
    an earlier one on the same machine (their on-disk caches), whose compile time a warm-up then does not pay."""
    counters = torch._dynamo.utils.counters
    return counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]


@contextlib.contextmanager
def compile_caches(warm: bool):
    """Where this run's compiles cache their work: the machine's usual directories (``warm``), or a fresh temporary
    one for Inductor, AOTAutograd and Triton alike, so that no configuration finds another run's graphs or kernels."""
    if warm:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="nf4compile-e2e-caches-") as fresh, mock.patch.dict(
        os.environ, {"TORCHINDUCTOR_CACHE_DIR": fresh, "TRITON_CACHE_DIR": os.path.join(fresh, "triton")}
    ):
        yield


def cleanup(device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()  # frees the CUDA-graph memory pools
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up_compiler(device) -> None:
    """One tiny compile before the timed ones: Inductor's worker pool, CUDA context and Triton's generic
    kernels start here, not inside whichever configuration happens to run first (its compile time would
    carry ~30 s that is no method's)."""
    tiny = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512, max_position_embeddings=64)
    model = build_bf16("tiny", {"tiny": tiny}, device)
    start = time.perf_counter()
    with torch.no_grad():
        generate(model, torch.randint(3, 512, (1, 8), device=device), 4, torch.compile(decode_step, fullgraph=True))
    print(f"compiler warm-up: {time.perf_counter() - start:.1f} s", flush=True)
    del model
    cleanup(device)


def estimate_s(method: str, results: list) -> float:
    """Seconds a configuration should take, from what already ran (compiles dominate)."""
    compiled = [r["compile_s"] for r in results if r.get("compile_s")]  # 7B and 8B compile alike
    if method in COMPILED:
        return 1.3 * max(compiled) + 20 if compiled else 0.0  # + building/quantizing the model
    return 20.0


# --- output ----------------------------------------------------------------------------------------


def environment(device) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        python=platform.python_version(),
        **{pkg: version(pkg) for pkg in ("torch", "triton", "transformers", "bitsandbytes", "torchao")},
    )


TARGETS = [  # (name, metric, threshold, higher is better) on llama-2-7b
    ("decode tok/s, batch 1, nf4compile", lambda r: r[1, "nf4compile"]["decode_tok_s"], 300, True),
    ("speedup over bf16 compiled, batch 1",
     lambda r: r[1, "nf4compile"]["decode_tok_s"] / r[1, "bf16-compiled"]["decode_tok_s"], 2.2, True),
    ("speedup over bf16 compiled, batch 8",
     lambda r: r[8, "nf4compile"]["decode_tok_s"] / r[8, "bf16-compiled"]["decode_tok_s"], 1.8, True),
    ("weight GB, nf4compile", lambda r: r[1, "nf4compile"]["weight_gb"], 4.0, False),
    ("compile time / bf16's, batch 1", lambda r: cold_compile_ratio(r[1, "nf4compile"], r[1, "bf16-compiled"]), 1.5, False),
]


def cold_compile_ratio(nf4: dict, bf16: dict) -> Optional[float]:
    """nf4's compile time over bf16's; None (not comparable) where either warm-up hit the compile caches or ran
    profiled."""
    if any(r.get("compile_cache_hits") or "compile_profile" in r for r in (nf4, bf16)):
        return None
    return nf4["compile_s"] / bf16["compile_s"]


def evaluate_targets(table: list, done: dict) -> list:
    """Rows of (target, value, threshold, met) for ``table``'s (name, metric, threshold, higher is better);
    ``done``: {(batch, method): finished result}. A target whose results are missing has value None."""
    rows = []
    for name, metric, threshold, higher in table:
        try:
            value = metric(done)
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        met = None if value is None else (value >= threshold if higher else value <= threshold)
        rows.append(dict(target=name, value=value, threshold=threshold, met=met))
    return rows


def targets(results: list) -> list:
    done = {(r["batch"], r["method"]): r for r in results if r["model"] == "llama-2-7b" and r["status"] == "ok"}
    return evaluate_targets(TARGETS, done)


def write_json(path: Path, report: dict, targets=targets) -> None:
    """The report with its targets (``targets(results)``), written atomically."""
    report["targets"] = targets(report["results"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)  # atomic: a kill mid-write never leaves a truncated file


def plot_panels(json_path: Path, panels: list, label, color, title: str) -> Path | None:
    """One bar chart per (result key, panel title) over the finished configurations, as a PNG beside the
    JSON; ``label(result)`` and ``color(result)`` name and colour each bar. None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(Path(json_path).read_text())
    ok = [r for r in report["results"] if r["status"] == "ok"]
    if not ok:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.7 * len(ok)), 3.2 * len(panels)))
    for ax, (key, panel_title) in zip(axes, panels):
        values = [r.get(key) or 0 for r in ok]
        bars = ax.bar(range(len(ok)), values, color=[color(r) for r in ok])
        ax.bar_label(bars, fmt="%.3g", fontsize=6)
        if key == "peak_gb":
            ax.bar(range(len(ok)), [r.get("weight_gb") or 0 for r in ok], fill=False, hatch="//")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xticks(range(len(ok)), [label(r) for r in ok], fontsize=6, rotation=90)
    fig.suptitle(title.format(**{**report["args"], **report["environment"]}), fontsize=10)
    fig.tight_layout()
    out = Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(json_path: Path) -> Path | None:
    """Decode tok/s, prefill ms, memory and compile time per configuration, as a PNG beside the JSON."""
    panels = [("decode_tok_s", "decode tokens/s per sequence"), ("prefill_ms", "prefill ms"),
              ("peak_gb", "peak GPU memory GB (weight GB hatched)"), ("compile_s", "compile s (warm-up generate)")]
    colors = {"bf16": "tab:gray", "nf4compile": "tab:green", "bnb": "tab:blue", "torchao": "tab:orange"}
    return plot_panels(
        json_path, panels, label=lambda r: f"{r['model']} b{r['batch']}\n{r['method']}",
        color=lambda r: colors.get(model_family(r["method"]), "tab:purple"), title="{device}: prompt {prompt}",
    )


# --- main ------------------------------------------------------------------------------------------


def run_configurations(plan: list, args, shapes: dict, device, report: dict, path: Path) -> Optional[Path]:
    """Every (model, batch, method) of ``plan`` that the budget allows, each result appended to ``report`` and written
    to ``path`` as it finishes; returns the PNG drawn last."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: JSON only (pip install 'nf4compile[plot]', then --plot the JSON)")
    if plan and device.type == "cuda" and args.compile_backend == "inductor":
        warm_up_compiler(device)
    png = None
    built: dict = {}  # (model, family) -> model, kept for the other batch size while its shape is current
    for name, batch, method in plan:
        entry = dict(model=name, batch=batch, method=method)
        left = args.gpu_budget_s - (time.monotonic() - START)
        if estimate_s(method, report["results"]) > left:
            entry.update(status="skipped", reason=f"budget: {left:.0f} s left")
        else:
            try:
                key = (name, model_family(method))
                if key not in built:
                    for other in [k for k in built if k[0] != name]:  # one shape on the device at a time
                        del built[other]
                    cleanup(device)
                    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                    model = build(name, method, shapes, device)
                    gc.collect()
                    model._bench_weight_bytes = torch.cuda.memory_allocated() - before if device.type == "cuda" else 0
                    built[key] = model
                model = built[key]
                entry.update(run_config(model, method, batch, args, device), status="ok")
                if device.type == "cuda":
                    entry["weight_gb"] = model._bench_weight_bytes / 1e9
            except Exception as e:  # noqa: BLE001  one failing method must not lose the others' results
                entry.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-4000:])
            cleanup(device)
        entry["elapsed_s"] = time.monotonic() - START
        report["results"].append(entry)
        write_json(path, report)
        png = plot(path)  # after every configuration too: a run cut short keeps its picture
        print(json.dumps({k: v for k, v in entry.items() if k != "trace"}), flush=True)
    return png


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--gpu-budget-s", type=float, default=420.0,
                        help="stop starting configurations whose estimated time exceeds what is left (from process start)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128, help="decode tokens for compiled methods")
    parser.add_argument("--eager-new-tokens", type=int, default=32,
                        help="decode tokens for eager methods (slow per token; tokens/s is a per-step average)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods in PLAN")
    parser.add_argument("--small", action="store_true", help="tiny shapes, on the CPU unless --device says otherwise (CI)")
    parser.add_argument("--device", default=None, help="default: cuda when available, cpu with --small")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend; CI's --small run uses 'eager' (tracing only: fullgraph checked, seconds not minutes)")
    parser.add_argument("--decode-graph", choices=("step", "trees"), default="step",
                        help="GPU: the compiled step captured whole in one CUDA graph (step), or mode='reduce-overhead' (trees)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="reuse this machine's compile caches (Inductor, AOTAutograd, Triton); by default the run compiles "
                             "into a fresh temporary directory, so that every compile time is a cold one")
    parser.add_argument("--profile-compile", type=int, default=0, metavar="TOP",
                        help="profile each compiled method's warm-up (cProfile: its compile_s runs ~2x slow) and record "
                             "the TOP functions by cumulative time, Triton's compile time and nf4compile's own")
    parser.add_argument("--plot", type=Path, default=None, help="only draw the PNG of this JSON")
    args = parser.parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return {}
    if args.small:
        args.prompt, args.new_tokens, args.eager_new_tokens = min(args.prompt, 16), min(args.new_tokens, 8), min(args.eager_new_tokens, 8)
    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    shapes = SMALL_MODELS if args.small else MODELS
    models, batches = args.models.split(","), [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",") if args.methods else None
    plan = [c for c in PLAN if c[0] in models and c[1] in batches and (methods is None or c[2] in methods)]

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"e2e-{'small' if args.small else device.type}-{stamp}.json"
    report = dict(environment=environment(device), args={k: str(v) for k, v in vars(args).items()}, results=[])
    report["args"]["prompt"] = args.prompt
    print(f"e2e: {len(plan)} configurations on {report['environment']['device']}; writing {path}", flush=True)
    write_json(path, report)  # the environment, even if the first compile is cut short

    with compile_caches(args.warm_caches):
        png = run_configurations(plan, args, shapes, device, report, path)
    for row in targets(report["results"]):
        print(f"target: {row['target']}: {row['value']} (threshold {row['threshold']}) met={row['met']}")
    print(f"wrote {path}" + (f" and {png}" if png else ""), flush=True)
    return report


if __name__ == "__main__":
    main()
