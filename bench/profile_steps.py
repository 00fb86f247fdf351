"""Where a step's time goes: a decode step or a QLoRA training step, profiled, kernels summed by kind.

    PYTHONPATH=. python bench/profile_steps.py decode [--configs nf4compile:1,bf16-compiled:1] [--out DIR]
    PYTHONPATH=. python bench/profile_steps.py qlora [--configs nf4compile:1,bf16-compiled:1] [--out DIR]
    PYTHONPATH=. python bench/profile_steps.py decode --small --compile-backend eager      # CPU (CI)

The timing benchmarks (bench/e2e.py, bench/qlora.py) say how long a step takes; this says why. Per
configuration (method:batch, the methods of those scripts; same models, same recipe): the step's wall
time unprofiled, then torch.profiler over a few steps: GPU kernel time per step, the time the GPU was
busy (union of kernel intervals) against the step's span, kernels per step, time by kind of kernel (NF4
GEMV, fused GEMM, dequantize, cuBLAS, attention, Inductor's Triton kernels, ...), the top kernels and the
top CPU ops by self time. A decode step on a GPU is the captured CUDA graph of bench/e2e.py (its kernels
show up in the profile); a GPU busy far below the span says the step waits on the host. Writes
profile-<decode|qlora>-<device>-<stamp>.json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402
import qlora  # noqa: E402

# Kernel name fragments -> kind, first match wins (Triton kernels are named after their jit functions).
KINDS = [
    ("nf4_gemv", "nf4 gemv"), ("nf4_mma_gemv", "nf4 mma gemv"), ("nf4_mm", "nf4 fused gemm"),
    ("nf4_dequantize", "nf4 dequantize"),
    ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
    ("gemm", "cuBLAS"), ("nvjet", "cuBLAS"), ("cutlass", "cuBLAS"), ("gemv", "cuBLAS"), ("splitkreduce", "cuBLAS"),
    ("triton_", "inductor triton"), ("elementwise", "aten elementwise"), ("reduce", "aten reduction"),
]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for fragment, kind in KINDS if fragment in name), "other")


def summarize(prof, steps: int, top: int = 25) -> dict:
    """Per-step sums of a profile over ``steps`` steps."""
    kernels, cpu = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    intervals = []
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kernels[event.name][0] += event.time_range.elapsed_us()
            kernels[event.name][1] += 1
            intervals.append((event.time_range.start, event.time_range.end))
        elif event.device_type == DeviceType.CPU:
            cpu[event.name][0] += event.self_cpu_time_total
            cpu[event.name][1] += 1
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    span = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
    kinds = defaultdict(lambda: [0.0, 0])
    for name, (us, calls) in kernels.items():
        kinds[kind_of(name)][0] += us
        kinds[kind_of(name)][1] += calls

    def per_step(table, key="us_per_step"):
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"name": name[:160], key: us / steps, "calls_per_step": calls / steps} for name, (us, calls) in rows]

    return {
        "kernel_us_per_step": sum(us for us, _ in kernels.values()) / steps,
        "gpu_busy_us_per_step": busy / steps,
        "gpu_span_us_per_step": span / steps,
        "kernels_per_step": sum(calls for _, calls in kernels.values()) / steps,
        "kinds": {row["name"]: row for row in per_step(kinds)},
        "top_kernels": per_step(kernels),
        "top_cpu_self": per_step(cpu, "self_us_per_step"),
    }


def profiled(step, device, warmup: int, timed: int, profiled_steps: int) -> dict:
    for _ in range(warmup):
        step()
    e2e.sync(device)
    start = time.perf_counter()
    for _ in range(timed):
        step()
    e2e.sync(device)
    wall_us = (time.perf_counter() - start) / timed * 1e6
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(profiled_steps):
            step()
        e2e.sync(device)
    return {"wall_us_per_step": wall_us, **summarize(prof, profiled_steps)}


def decode_config(method: str, batch: int, args, device, shapes) -> dict:
    model = e2e.build("llama-2-7b", method, shapes, device)
    prompt = torch.randint(3, model.config.vocab_size, (batch, args.prompt), device=device)
    compiled = torch.compile(e2e.decode_step, backend=args.compile_backend, fullgraph=method in e2e.FULLGRAPH)
    step_fn = e2e.CapturedStep(compiled) if device.type == "cuda" and args.compile_backend == "inductor" else compiled
    generated, warmup = 4, 2
    # Every call of the step writes its keys and values to the cache's next free slot (a StaticCache counts
    # the slots it has filled), whatever position it is given: room for generate's tokens and all our steps.
    cache = e2e.new_cache(model, args.prompt + generated + warmup + args.steps + args.profiled_steps)
    with torch.no_grad():
        e2e.generate(model, prompt, generated, step_fn, cache)  # compiles (and captures) the step
        token, position = prompt[:, -1:].contiguous(), torch.tensor([[args.prompt + generated]], device=device)
        return profiled(lambda: step_fn(model, cache, token, position), device, warmup, args.steps, args.profiled_steps)


def qlora_config(method: str, batch: int, args, device, shapes) -> dict:
    model = qlora.build(method, shapes, device)
    if method in qlora.COMPILED:
        qlora.compile_layers(model, method, args.compile_backend)
    ids = torch.randint(3, model.config.vocab_size, (batch, args.seq), device=device)
    return profiled(qlora.training_step(model, ids), device, 2, args.steps, args.profiled_steps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["decode", "qlora"])
    parser.add_argument("--configs", default="nf4compile:1,bf16-compiled:1", help="method:batch, comma-separated")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--prompt", type=int, default=128, help="decode: prompt length before the profiled step")
    parser.add_argument("--seq", type=int, default=512, help="qlora: sequence length")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (unprofiled)")
    parser.add_argument("--profiled-steps", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--device", default=None, help="default: cuda when available, cpu with --small")
    parser.add_argument("--compile-backend", default="inductor", help="CI's --small run uses 'eager'")
    args = parser.parse_args(argv)
    if args.small:
        args.prompt, args.seq, args.steps, args.profiled_steps = 8, 16, 2, 1
    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    shapes = e2e.SMALL_MODELS if args.small else e2e.MODELS
    run = decode_config if args.workload == "decode" else qlora_config
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {"environment": e2e.environment(device), "args": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{args.workload}-{'small' if args.small else device.type}-{stamp}.json"
    for config in args.configs.split(","):
        method, batch = config.split(":")
        e2e.cleanup(device)
        report["results"][config] = result = run(method, int(batch), args, device, shapes)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(config, json.dumps({k: v for k, v in result.items() if k not in ("top_kernels", "top_cpu_self")}), flush=True)
    print(f"wrote {path}", flush=True)
    return report


if __name__ == "__main__":
    main()
