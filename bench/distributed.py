"""Multiple GPUs: a Llama-70B-shaped QLoRA step under FSDP2, and tensor-parallel decoding vs one GPU.

    torchrun --nproc-per-node 2 bench/distributed.py --out $OUT [--budget-s 540]
    torchrun --nproc-per-node 2 bench/distributed.py --small --out /tmp/d      # CPU, gloo, tiny shapes

Random weights (no downloads), every Linear but lm_head in NF4 (block 64, double quant), bf16 compute.

qlora-fsdp2: Llama-70B shape (80 layers unless --layers), peft LoRA r=16 alpha=32 on q/k/v/o/gate/up/down
(fp32 adapters), every decoder layer ``fully_shard``ed as soon as it is quantized, then the root (FSDP2 over
all ranks: each GPU holds 1/N of the NF4 codes and scales and all-gathers them as NF4; the whole NF4 model
never sits on one GPU, the recipe for models that would not fit), activation checkpointing per decoder layer
(HF's, non-reentrant; --no-checkpointing turns it off), a different random batch of --batch x --seq tokens
per rank, AdamW. Eager. A step: forward with labels, backward, optimizer step, zero_grad. Reported: median
step time over --steps after --warmup, tokens/s per GPU, weight memory and peak memory per GPU
(``max_memory_allocated``), the bytes one step all-gathers vs the bf16 bytes of the same parameters.

decode-1gpu / decode-tp: a --decode-layers slice of the same shape (default 16 of 80 layers: whole-step
compiles of 80 layers take minutes each), batch 1, --prompt tokens then --new-tokens greedy tokens with
a static KV cache; eager prefill, the decode step ``torch.compile``d (mode="reduce-overhead" on GPUs), the
recipe of bench/e2e.py. decode-1gpu runs the whole model on each GPU independently (rank 0 reported);
decode-tp shards it over all ranks with ``parallelize_module`` and ``nf4compile.distributed
.tensor_parallel_plan`` (q/k/v/gate/up column-wise, o/down row-wise; embeddings and lm_head replicated).
Reported: decode tok/s, TP speedup, peak memory per GPU, fused-op counts of the compiled step, whether TP
produced the same tokens as one GPU.

Phases run in that order while --budget-s lasts (each one's time estimated from what ran); rank 0 rewrites
the JSON (GPU names of every rank, versions, date, arguments, results) in --out after each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from e2e import cleanup, decode_step, environment, generate, new_cache, sync  # noqa: E402

START = time.monotonic()
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHASES = ["qlora-fsdp2", "decode-1gpu", "decode-tp"]


# --- model -----------------------------------------------------------------------------------------


def build_nf4_llama(shapes: dict, layers: int, device, prepare_layer=None) -> nn.Module:
    """Llama of ``shapes`` with ``layers`` decoder layers, NF4, built one layer at a time on ``device``: each
    layer is materialized, quantized and handed to ``prepare_layer`` (adapters, its FSDP2 shard) before the
    next, so neither the dense model nor, when sharded, the whole NF4 model ever sits on one GPU. Same seeds
    on every rank, so same weights."""
    import nf4compile
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**shapes, "num_hidden_layers": layers}, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parts = [model.model.embed_tokens, model.model.norm, model.lm_head, *model.model.layers]
    for seed, part in enumerate(parts):
        part.to_empty(device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in part.named_parameters():
                is_norm = "norm" in name or part is model.model.norm
                param.fill_(1.0) if is_norm else param.normal_(0.0, 0.02)
        if seed >= 3:  # a decoder layer
            nf4compile.quantize(part)
            if prepare_layer is not None:
                prepare_layer(part)
    with torch.device(device):  # the rotary embedding's buffers are computed, not initialized
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def weight_bytes_per_gpu(model: nn.Module) -> int:
    """Bytes of this rank's parameters (NF4 codes and scales where NF4; shards where sharded)."""
    from torch.distributed.tensor import DTensor

    from nf4compile import NF4Tensor

    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.nbytes_quantized() if isinstance(local, NF4Tensor) else local.numel() * local.element_size()
    return total


def bf16_gathered_bytes(model: nn.Module, layers) -> int:
    """What FSDP2 would all-gather in one step if every parameter were bf16: each decoder layer in the forward
    and again in the backward, the root's parameters (embeddings, final norm, lm_head) once."""
    layer_numel = sum(p.numel() for p in layers.parameters())
    return 2 * (2 * layer_numel + sum(p.numel() for p in model.parameters()) - layer_numel)


# --- phases ----------------------------------------------------------------------------------------


def qlora_fsdp2(args, shapes: dict, device) -> dict:
    from peft import LoraConfig, inject_adapter_in_model
    from torch.distributed.fsdp import fully_shard

    from nf4compile.distributed import AllGatherBytes

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_MODULES)

    def prepare_layer(layer: nn.Module) -> None:  # peft's adapters (fp32, as get_peft_model makes them), then the shard
        layer.requires_grad_(False)
        inject_adapter_in_model(lora, layer)
        for name, module in layer.named_modules():
            if name.endswith(("lora_A", "lora_B")):
                module.float()
        fully_shard(layer)

    layers = args.layers or shapes["num_hidden_layers"]
    model = build_nf4_llama(shapes, layers, device, prepare_layer)
    for frozen in (model.model.embed_tokens, model.model.norm, model.lm_head):
        frozen.requires_grad_(False)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layer_list = model.model.layers
    fully_shard(model)
    weight_gb = weight_bytes_per_gpu(model) / 1e9
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own data
    vocab = shapes["vocab_size"]

    def step(record: AllGatherBytes | None = None) -> tuple[float, float]:
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        sync(device)
        start = time.perf_counter()
        with record or contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, loss.item()

    gathered = AllGatherBytes()
    step(gathered)  # untimed: the first step, with the all-gathers recorded
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = [step() for _ in range(args.steps)]
    seconds = [t for t, _ in timed]
    result = dict(
        layers=layers, batch_per_gpu=args.batch, seq=args.seq, activation_checkpointing=args.checkpointing,
        step_s=statistics.median(seconds), step_s_all=seconds, losses=[loss for _, loss in timed],
        tokens_per_s_per_gpu=args.batch * args.seq / statistics.median(seconds), weight_gb_per_gpu=weight_gb,
        gathered_gb_per_step=sum(gathered.sizes) / 1e9,
        bf16_gathered_gb_per_step=bf16_gathered_bytes(model, layer_list) / 1e9,
        lora_params=sum(p.numel() for p in model.parameters() if p.requires_grad) * dist.get_world_size(),
    )
    if device.type == "cuda":
        result["peak_gb_per_gpu"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def decode(model: nn.Module, args, device) -> dict:
    """Compile the decode step, warm up, then time one generation (bench/e2e.py's recipe). On GPUs CUDA graphs
    first (mode="reduce-overhead"); if that fails (collectives captured in a graph, say), the error is kept and
    the step is compiled again without them."""
    cuda_graphs = device.type == "cuda" and args.compile_backend == "inductor" and args.cuda_graphs
    try:
        return dict(mode="reduce-overhead" if cuda_graphs else "default", **_timed_generation(model, args, device, cuda_graphs))
    except Exception as e:  # noqa: BLE001
        if not cuda_graphs:
            raise
        cleanup(device)
        return dict(mode="default", cuda_graphs_error=f"{type(e).__name__}: {e}"[:1000],
                    **_timed_generation(model, args, device, False))


def _timed_generation(model: nn.Module, args, device, cuda_graphs: bool) -> dict:
    from torch._inductor.utils import run_and_get_code

    mode = "reduce-overhead" if cuda_graphs else None
    step = torch.compile(decode_step, backend=args.compile_backend, mode=mode, fullgraph=True)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(7))
    prompt = prompt.to(device)
    cache = new_cache(model, args.prompt + args.new_tokens)  # one cache (one shape): the warm-up's graphs serve
    start = time.monotonic()
    with torch.no_grad():
        _, code = run_and_get_code(generate, model, prompt, 3, step, cache)
        compile_s = time.monotonic() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings: dict = {}
        tokens = generate(model, prompt, args.new_tokens, step, cache, timings)
    result = dict(decode_tok_s=(args.new_tokens - 1) / timings["decode_s"], prefill_ms=timings["prefill_s"] * 1e3,
                  compile_s=compile_s, tokens=tokens[0, args.prompt:].tolist(), sequence=tokens[0].tolist())
    if code:
        result.update(fused_linear_calls=sum(c.count("torch.ops.nf4compile.linear.default(") for c in code),
                      dequantize_calls=sum(c.count("torch.ops.nf4compile.dequantize.default(") for c in code))
    if device.type == "cuda":
        result["peak_gb_per_gpu"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def decode_phases(args, shapes: dict, device, report: dict, path: Path, phases: list[str]) -> None:
    """decode-1gpu, then decode-tp on the same weights (built once per rank, then sharded)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from nf4compile.distributed import tensor_parallel_plan

    built: dict = {}

    def model() -> nn.Module:
        if "model" not in built:
            built["model"] = build_nf4_llama(shapes, args.decode_layers, device)
        return built["model"]

    def one_gpu() -> dict:
        # Greedy tokens of random-weight models part ways at the first near-tie (top-2 logits within bf16
        # noise), so TP is compared with one GPU on the logits of one fixed random sequence.
        built["sequence"] = torch.randint(3, shapes["vocab_size"], (1, args.prompt + args.new_tokens),
                                          generator=torch.Generator().manual_seed(11)).to(device)
        built["logits"], built["hidden"] = teacher_forced(model(), built["sequence"])
        result = decode(model(), args, device)
        # The same eager forward after the compiled decode: nothing the CUDA graphs did may change it.
        after, _ = teacher_forced(model(), built["sequence"])
        result["logits_changed_by_compiled_decode"] = (after - built["logits"]).abs().max().item()
        return dict(layers=args.decode_layers, weight_gb_per_gpu=weight_bytes_per_gpu(model()) / 1e9, **result)

    def tensor_parallel() -> dict:
        cleanup(device)  # the one-GPU compile and its CUDA graphs
        parallelize_module(model(), init_device_mesh(device.type, (dist.get_world_size(),)), tensor_parallel_plan(model()))
        result = dict(layers=args.decode_layers, weight_gb_per_gpu=weight_bytes_per_gpu(model()) / 1e9,
                      **decode(model(), args, device))
        if "logits" in built:
            logits, hidden = teacher_forced(model(), built["sequence"])
            result.update(logits_vs_1gpu(logits, built["logits"]))
            # Where TP departs from one GPU: the relative distance of each layer's output (embeddings first).
            result["hidden_rel_diff_per_layer"] = [((a - b).norm() / b.norm()).item() for a, b in zip(hidden, built["hidden"])]
        return result

    for name, fn in (("decode-1gpu", one_gpu), ("decode-tp", tensor_parallel)):
        if name in phases:
            run_phase(name, fn, args, report, path)
    one, tp = (next((r for r in report["results"] if r["phase"] == p), {}) for p in ("decode-1gpu", "decode-tp"))
    if one.get("status") == tp.get("status") == "ok":
        tp["speedup_vs_1gpu"] = tp["decode_tok_s"] / one["decode_tok_s"]
        tp["same_tokens_as_1gpu"] = sum(a == b for a, b in zip(one["tokens"], tp["tokens"])) / len(one["tokens"])
        write_report(path, report)
        if dist.get_rank() == 0:
            print(json.dumps({k: tp[k] for k in ("speedup_vs_1gpu", "same_tokens_as_1gpu")}), flush=True)


# --- running and reporting -------------------------------------------------------------------------


def teacher_forced(model: nn.Module, sequence: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits and every layer's hidden states (fp32, whole tensors) of one eager forward of ``sequence``."""
    with torch.no_grad():
        output = model(input_ids=sequence, output_hidden_states=True)
    whole = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t)[0].float()
    return whole(output.logits), [whole(h) for h in output.hidden_states]


def logits_vs_1gpu(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far TP's logits are from one GPU's on the same sequence, and whether the top-1 token agrees at
    every position where one GPU's top-2 margin exceeds twice that distance (no bf16 near-tie)."""
    diff = (logits - reference).abs().max().item()
    top2 = reference.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * diff
    same = logits.argmax(-1) == reference.argmax(-1)
    return dict(logits_max_abs_diff=diff, logits_max_abs=reference.abs().max().item(),
                top1_agreement=same.float().mean().item(), clear_positions=int(clear.sum()),
                top1_agreement_where_clear=same[clear].float().mean().item() if clear.any() else None)


def run_phase(name: str, fn, args, report: dict, path: Path) -> None:
    """Run a phase on every rank (or skip it on every rank); rank 0 records every rank's outcome."""
    left = args.budget_s - (time.monotonic() - START)
    estimate = estimate_s(name, report["results"], args)
    decision = [estimate <= left]
    dist.broadcast_object_list(decision, src=0)  # every rank skips or runs alike (collectives inside)
    entry = dict(phase=name)
    if not decision[0]:
        entry.update(status="skipped", reason=f"budget: {left:.0f} s left, ~{estimate:.0f} s estimated")
    else:
        phase_start = time.monotonic()
        try:
            entry.update(fn(), status="ok")
        except Exception as e:  # noqa: BLE001  a failing phase must not lose the others' results
            entry.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-4000:])
        entry["elapsed_s"] = time.monotonic() - phase_start
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {k: entry.get(k) for k in ("status", "error", "peak_gb_per_gpu", "weight_gb_per_gpu")})
    entry["per_rank"] = per_rank
    report["results"].append(entry)
    write_report(path, report)
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in entry.items() if k not in ("trace", "tokens", "sequence", "step_s_all")}), flush=True)


def estimate_s(name: str, results: list, args) -> float:
    """Seconds a phase should take, from what already ran (0 when nothing is known: run it)."""
    done = {r["phase"]: r.get("elapsed_s", 0.0) for r in results if r.get("status") == "ok"}
    if name == "decode-tp" and "decode-1gpu" in done:
        return 1.2 * done["decode-1gpu"]
    if name == "decode-1gpu" and "qlora-fsdp2" in done:  # building the model dominates, scaled by layers
        layers = args.layers or (SMALL if args.small else LLAMA_70B)["num_hidden_layers"]
        return 0.5 * done["qlora-fsdp2"] * args.decode_layers / layers + (30.0 if args.small else 180.0)
    return 0.0


def write_report(path: Path, report: dict) -> None:
    if dist.get_rank() == 0:
        path.write_text(json.dumps(report, indent=1, default=str))


def gpu_environment(device) -> dict:
    env = environment(device)
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, torch.cuda.get_device_name() if device.type == "cuda" else env["device"])
    env.update(devices=names, world_size=dist.get_world_size(), backend=dist.get_backend())
    for pkg in ("peft",):
        env[pkg] = importlib.metadata.version(pkg)
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no phase estimated to exceed what is left")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers for qlora-fsdp2 (default: all 80)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--decode-layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile-backend", default="inductor", help="'eager' traces only (a quick CPU check)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help='compile the decode step without mode="reduce-overhead"')
    parser.add_argument("--small", action="store_true", help="tiny shapes, CPU and gloo")
    args = parser.parse_args(argv)
    if args.small:
        args.seq, args.steps, args.decode_layers, args.prompt, args.new_tokens = 32, 2, 2, 8, 8
    shapes = SMALL if args.small else LLAMA_70B

    cuda = torch.cuda.is_available() and not args.small
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    own_group = not dist.is_initialized()  # tests call main() inside their own process group
    if own_group:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        env = {**gpu_environment(device), "date": stamp}
        path = args.out / f"distributed-{'small' if args.small else device.type}-{dist.get_world_size()}x-{stamp}.json"
        report = dict(environment=env, args={k: str(v) for k, v in vars(args).items()}, shapes=shapes, results=[],
                      notes=[f"decode phases use {args.decode_layers} of the model's {shapes['num_hidden_layers']} "
                             "decoder layers (same per-layer shapes)"])
        write_report(path, report)
        phases = args.phases.split(",")
        if "qlora-fsdp2" in phases:
            run_phase("qlora-fsdp2", lambda: qlora_fsdp2(args, shapes, device), args, report, path)
            cleanup(device)
        decode_phases(args, shapes, device, report, path, phases)
        if dist.get_rank() == 0:
            print(f"wrote {path}", flush=True)
        return report
    finally:
        # CUDA graphs holding captured NCCL collectives go first: with them alive, destroy_process_group
        # hung after the TP decode phase (2x H200, torch 2.11).
        cleanup(device)
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
