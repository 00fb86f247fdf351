"""NF4 linear kernels against bf16 cuBLAS and what users would pick instead, on one GPU, in one run.

    python bench/nf4_kernels.py [--tune] [--out DIR] [--shapes 4096x4096,...] [--ms 1,4,...] [--group-ms 1,8]

Methods per (N, K, M): bf16 F.linear (cuBLAS); unfused (our dequantize + cuBLAS); fused
(torch.ops.nf4compile.linear, i.e. the dispatcher); bitsandbytes matmul_4bit (nf4, double quant, bf16
compute) and torchao linear_nf4 under torch.compile, when installed; for M >= 256 also cuBLAS on the
weight our dequantize produced (bf16_dequantized_w: the unfused path without its dequantize). NF4 weights are bitsandbytes'
own quantize_4bit output when it is installed (our ops read its format as is), with double
quantization and block size 64.

Timing: triton.testing.do_bench (CUDA events, warm-up, median; it zeroes a 256 MB buffer before
every call, so L2 is cold); points with M <= 256 are also timed as CUDA-graph replays over enough
weight copies to overflow L2 three times (speedups then compare graph times); the eager per-call
cost (Python + dispatch) is reported separately. Bandwidth figures count the bytes a method must move (weights in its format, x, out) and
compare them with a device-to-device copy measured in the same run.

Sibling groups (M = 1, or each of --group-ms): nf4compile.linear_group (one launch over q, k and v, or gate and up: what
the GroupSiblingLinears pass makes of a decoder layer) against one nf4compile.linear per weight.

--tune times every candidate plan of the dispatcher first (ops/triton_linear.py) and writes the
winners as tuned_configs_<chip>.json (e.g. _h100) into --out; without it the dispatcher uses the shipped plans.
Writes <gpu>-<date><suffix>.json and .png into --out (default bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

import nf4compile  # noqa: F401  registers the ops and their CUDA kernels
from nf4compile import format as nf4_format
from nf4compile.ops import triton_linear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
MS = [1, 4, 16, 64, 256, 2048]
BLOCK = 64
L2_FLUSH_FACTOR = 3  # graph timing rotates through weight copies worth 3x the L2 size
# Graph-time every point up to this M: there the eager host cost of a call (tens of us) can exceed
# the ~90 us that do_bench's L2 flush gives the host to run ahead, and do_bench then times the host.
GRAPH_MAX_M = 256

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
try:  # torchao 0.18 moved NF4 under quantization/quantize_
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4 as torchao_to_nf4
except ImportError:
    try:
        from torchao.dtypes.nf4tensor import linear_nf4, to_nf4 as torchao_to_nf4
    except ImportError:
        linear_nf4 = None


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_us(make_call, copies: int) -> float:
    """Median per call of a CUDA graph holding one call per weight copy (L2 never warm)."""
    return triton_linear.cuda_graph_us([make_call(i) for i in range(copies)])


def eager_call_us(fn, calls: int = 200) -> float:
    """Host time per back-to-back call: the launch cost when it exceeds the GPU time."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def copy_bandwidth_tbps() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    return 2 * src.numel() / us / 1e6


class NF4Weight:
    """One NF4 weight in bitsandbytes' format (double quant), as our ops take it."""

    def __init__(self, w: torch.Tensor):
        self.N, self.K = w.shape
        if bnb is not None:
            packed, self.bnb_state = bnb.functional.quantize_4bit(
                w, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
            self.bnb_packed = packed
            s = self.bnb_state
            self.args = (packed.view(-1), s.absmax, s.state2.absmax, s.offset)
        else:
            packed, absmax = nf4_format.quantize_nf4(w, BLOCK)
            codes, nested, offset = nf4_format.double_quantize(absmax)
            self.args = (packed, codes, nested, offset)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args)

    def copy(self) -> "NF4Weight":
        clone = object.__new__(NF4Weight)
        clone.__dict__.update(self.__dict__)
        clone.args = tuple(t.clone() for t in self.args)
        return clone

    def fused(self, x):
        return torch.ops.nf4compile.linear(x, *self.args, BLOCK, self.N, self.K)

    def unfused_weight(self, dtype=torch.bfloat16):
        return torch.ops.nf4compile.dequantize(*self.args, BLOCK, [self.N, self.K], dtype)

    def unfused(self, x):
        return F.linear(x, self.unfused_weight(x.dtype))


def check_against_bitsandbytes(weight: NF4Weight, w: torch.Tensor) -> dict:
    ours = torch.ops.nf4compile.dequantize(*weight.args, BLOCK, [weight.N, weight.K], torch.bfloat16)
    theirs = bnb.functional.dequantize_4bit(weight.bnb_packed, weight.bnb_state)
    x = torch.randn(3, weight.K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ theirs.double().T
    fused = weight.fused(x).double()
    return {
        "dequantize_bit_identical_to_bnb": bool(torch.equal(ours, theirs)),
        "fused_rel_err_vs_bnb_weights": ((fused - ref).norm() / ref.norm()).item(),
    }


def tune(weight: NF4Weight, x: torch.Tensor) -> list:
    timings = []
    x2 = x.reshape(-1, weight.K)
    plan = triton_linear.tune_plan(x2, *weight.args, BLOCK, weight.N, weight.K, None, False, timings)
    return [{"plan": p, "us": ms * 1e3, "chosen": p is plan} for p, ms in timings]


def bench_shape(N, K, ms, args, copy_tbps, rows, tuning, checks):
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    weight = NF4Weight(w)
    if bnb is not None and not checks:
        checks.update(check_against_bitsandbytes(weight, w))
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    dequant_us = median_us(lambda: torch.ops.nf4compile.dequantize(*weight.args, BLOCK, [N, K], torch.bfloat16))
    dequant_tbps = (weight.nbytes() + N * K * 2) / dequant_us / 1e6
    rows.append({"N": N, "K": K, "M": 0, "method": "dequantize", "us": dequant_us, "tbps": dequant_tbps,
                 "pct_copy_bw": 100 * dequant_tbps / copy_tbps})
    print(f"{N:>6}x{K:<6} dequantize {dequant_us:8.1f}us {dequant_tbps:.2f} TB/s", flush=True)
    ao_weight = torchao_to_nf4(w, BLOCK, 256) if linear_nf4 is not None else None
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        io_bytes = (M * K + M * N) * 2
        if args.tune:
            tuning.append({"N": N, "K": K, "M": M, "candidates": tune(weight, x)})
        methods = {
            "bf16": (lambda: F.linear(x, w), N * K * 2),
            "unfused": (lambda: weight.unfused(x), weight.nbytes()),
            "fused": (lambda: weight.fused(x), weight.nbytes()),
        }
        if M >= 256:  # cuBLAS on the weight our dequantize produced: the unfused path minus dequant
            w_dq = weight.unfused_weight()
            methods["bf16_dequantized_w"] = (lambda: F.linear(x, w_dq), N * K * 2)
        if bnb is not None:
            methods["bnb"] = (lambda: bnb.matmul_4bit(x, weight.bnb_packed.t(), weight.bnb_state), weight.nbytes())
        # torchao at the first of --torchao-ms on every shape, at the others while its time budget
        # lasts (each point is a fresh compile).
        if ao_weight is not None and M in args.torchao_ms and (
            M == args.torchao_ms[0] or args.torchao_spent_s < args.torchao_budget_s
        ):
            torch._dynamo.reset()  # torchao specializes per shape; compile afresh
            compiled = torch.compile(linear_nf4)
            methods["torchao"] = (lambda: compiled(x, ao_weight), weight.nbytes())
        for name, (fn, weight_bytes) in methods.items():
            t0 = time.perf_counter()
            us = median_us(fn)
            if name == "torchao":
                args.torchao_spent_s += time.perf_counter() - t0
            row = {"N": N, "K": K, "M": M, "method": name, "us": us}
            if M <= GRAPH_MAX_M and name in ("bf16", "unfused", "fused"):
                copies = max(2, math.ceil(L2_FLUSH_FACTOR * l2 / weight_bytes))
                row["us_graph"] = graph_us(_graph_call(name, w, weight, x, copies), copies)
            row["tbps"] = (weight_bytes + io_bytes) / min(row["us"], row.get("us_graph", math.inf)) / 1e6
            row["pct_copy_bw"] = 100 * row["tbps"] / copy_tbps
            rows.append(row)
        point = [r for r in rows if (r["N"], r["K"], r["M"]) == (N, K, M)]
        bf16 = point[0]
        for r in point:
            # Like with like: graph times where both have one (few-us kernels), else do_bench medians.
            key = "us_graph" if "us_graph" in r and "us_graph" in bf16 else "us"
            r["speedup_vs_bf16"] = bf16[key] / r[key]
            r["speedup_timing"] = key
        line = "  ".join(f"{r['method']} {r[r['speedup_timing']]:8.1f}us x{r['speedup_vs_bf16']:.2f}" for r in point)
        print(f"{N:>6}x{K:<6} M={M:<5} {line}", flush=True)
    del weight, w, ao_weight
    torch.cuda.empty_cache()


def _graph_call(name, w, weight, x, copies):
    # Each call reads its own weight copy; copies are made lazily so one method's copies at a time.
    if name == "bf16":
        ws = [w.clone() for _ in range(copies)]
        return lambda i: (lambda: F.linear(x, ws[i]))
    weights = [weight.copy() for _ in range(copies)]
    return lambda i: (lambda: getattr(weights[i], name)(x))


def eager_overheads() -> dict:
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    weight = NF4Weight(w)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    return {
        "shape": "4096x4096, M=1",
        "bf16_host_us_per_call": eager_call_us(lambda: F.linear(x, w)),
        "fused_host_us_per_call": eager_call_us(lambda: weight.fused(x)),
        "unfused_host_us_per_call": eager_call_us(lambda: weight.unfused(x)),
    }


# Sibling linears of one input, as GroupSiblingLinears groups them: (rows of each weight, K).
SIBLING_GROUPS = [((4096, 4096, 4096), 4096), ((11008, 11008), 4096), ((4096, 1024, 1024), 4096), ((14336, 14336), 4096)]


def bench_sibling_groups(groups, ms, tune_group: bool) -> list:
    """M rows of activations (each of ``ms``): one nf4compile.linear_group launch over sibling weights against
    one nf4compile.linear each, CUDA-graph times over weight copies worth 3x L2. With tune_group, every
    prefetching gemv candidate and every mma gemv candidate is timed as that group launch (for M > 1 also the
    plan the group borrows from the nearest tuned width, see _nearest_shipped) and the fastest lands in the
    exported plans, filed under the group's total rows as the dispatcher looks it up. (Timing one stacked weight
    of all the rows instead, as before, chose a q/k/v plan slower as a group than the one it replaced:
    bench/NOTES.md.)"""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for (sizes, K), M in itertools.product(groups, ms):
        weights = [NF4Weight(torch.randn(n, K, device="cuda", dtype=torch.bfloat16)) for n in sizes]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        copies = max(2, math.ceil(L2_FLUSH_FACTOR * l2 / sum(w.nbytes() for w in weights)))
        sets = [[w.copy() for w in weights] for _ in range(copies)]

        def group_call(ws, plan=None):
            lists = [list(parts) for parts in zip(*(w.args for w in ws))]
            return lambda: triton_linear.nf4_linear_group(x, *lists, BLOCK, list(sizes), K, [None] * len(ws), plan=plan)

        timings = []
        if tune_group:
            # The prefetching gemv plans (every M = 1 winner, shapes and groups, since they exist) and the mma gemv's.
            candidates = [c for c in triton_linear.candidate_plans(M, False, x.dtype)
                          if c.get("config", {}).get("prefetch") or c["path"] == "mma_gemv"]
            if M > 1:
                candidates.append(triton_linear.cached_plan(x, sum(sizes), K, BLOCK, False))
            best = triton_linear.fastest_plan(candidates, lambda plan: [group_call(ws, plan) for ws in sets], timings)
            triton_linear.remember_plan(x, sum(sizes), K, BLOCK, False, best)
        plan = triton_linear.cached_plan(x, sum(sizes), K, BLOCK, False)

        separate = torch.cat([w.fused(x) for w in weights], dim=-1).double()
        grouped = group_call(weights)().double()
        rows.append({
            "weights": " + ".join(f"{n}x{K}" for n in sizes),
            "M": M,
            "plan": plan,
            "us_separate": graph_us(lambda i: (lambda ws=sets[i]: [w.fused(x) for w in ws]), copies),
            "us_group": graph_us(lambda i: group_call(sets[i]), copies),
            "rel_diff_vs_separate": ((grouped - separate).norm() / separate.norm()).item(),
            **({"tuning": [{"plan": p, "us": ms * 1e3} for p, ms in timings]} if timings else {}),
        })
        rows[-1]["speedup"] = rows[-1]["us_separate"] / rows[-1]["us_group"]
        print(json.dumps(rows[-1]), flush=True)
        del sets, weights
    return rows


def export_plans(path: Path, meta: dict) -> None:
    plans = [
        {"x_at_w": xw, "N": n, "K": k, "m_bucket": b, **plan}
        for (xw, n, k, b, dtype, block), plan in sorted(triton_linear._PLANS.items(), key=str)
        if dtype == torch.bfloat16 and block == BLOCK
    ]
    path.write_text(json.dumps({**meta, "plans": plans}, indent=1) + "\n")


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(2, math.ceil(len(shapes) / 2), figsize=(4.2 * math.ceil(len(shapes) / 2), 7.5),
                             squeeze=False)
    for ax, (N, K) in zip(axes.flat, shapes):
        for method in ("fused", "unfused", "bnb", "torchao"):
            pts = sorted((r["M"], r["speedup_vs_bf16"]) for r in rows if (r["N"], r["K"], r["method"]) == (N, K, method))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="bf16 cuBLAS")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{N} x {K}")
        ax.set_xlabel("M")
        ax.set_ylabel("speedup over bf16")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--group-ms", default="1", help="activation rows of the sibling-group runs")
    parser.add_argument("--torchao-ms", default="1,2048", help="the first on every shape, the others while "
                        "--torchao-budget-s (compile and timing) lasts")
    parser.add_argument("--torchao-budget-s", type=float, default=120.0)
    parser.add_argument("--suffix", default="", help="appended to the result files' names, e.g. --suffix=-v2 for a second run that day")
    parser.add_argument("--profile", action="store_true", help="only run the fused op 3 times per point (for ncu)")
    args = parser.parse_args()
    parse_shapes = lambda s: [tuple(map(int, p.split("x"))) for p in s.split(",") if p]
    shapes, ms = parse_shapes(args.shapes), [int(m) for m in args.ms.split(",")]
    args.torchao_spent_s = 0.0
    args.torchao_ms = [int(m) for m in args.torchao_ms.split(",") if m]
    args.out.mkdir(parents=True, exist_ok=True)

    if args.profile:
        for N, K in shapes:
            weight = NF4Weight(torch.randn(N, K, device="cuda", dtype=torch.bfloat16))
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    weight.fused(x)
        torch.cuda.synchronize()
        return
    gpu = torch.cuda.get_device_name(0)
    meta = {
        "gpu": gpu,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None),
        "torchao": __import__("torchao").__version__ if linear_nf4 is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "block_size": BLOCK,
        "double_quant": True,
        "timing": "do_bench median (L2 zeroed before each call); us_graph: CUDA-graph replay over weight "
                  f"copies worth {L2_FLUSH_FACTOR}x L2 (M <= {GRAPH_MAX_M}); a speedup compares graph times where both methods "
                  "have one, do_bench medians otherwise",
    }
    meta["copy_tbps"] = copy_bandwidth_tbps()
    print(f"{gpu}  torch {torch.__version__}  triton {triton.__version__}  copy {meta['copy_tbps']:.2f} TB/s")
    rows, tuning, checks = [], [], {}
    stem = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() + "-" + meta["date"][:10] + args.suffix
    result = {**meta, "checks": checks, "rows": rows}
    plans_path = args.out / triton_linear.tuned_configs(triton_linear.gpu_chip(gpu)).name
    plans_meta = {k: meta[k] for k in ("gpu", "torch", "triton", "date")}
    if args.tune:
        result["tuning"] = tuning
    for N, K in shapes:
        bench_shape(N, K, ms, args, meta["copy_tbps"], rows, tuning, checks)
        # Written after every shape: a run cut short (a device lease's time limit) keeps what it measured.
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(rows, args.out / f"{stem}.png", f"NF4 linear vs bf16 cuBLAS on {gpu} (double quant, block {BLOCK})")
        if args.tune:
            export_plans(plans_path, plans_meta)
    group_ms = [int(m) for m in args.group_ms.split(",") if m]
    result["sibling_groups"] = bench_sibling_groups(SIBLING_GROUPS, group_ms, args.tune)
    if args.tune:  # again: the groups' tuned plans
        export_plans(plans_path, plans_meta)
    result["eager_overhead"] = eager_overheads()
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"checks": checks, "eager_overhead": result["eager_overhead"]}, indent=1))


if __name__ == "__main__":
    main()
