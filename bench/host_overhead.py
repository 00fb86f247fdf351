"""Host time of one eager ``nf4compile.linear`` call, layer by layer (where the microseconds go).

    PYTHONPATH=. python bench/host_overhead.py --out bench/results          # CUDA
    PYTHONPATH=. python bench/host_overhead.py --calls 50 --out /tmp/h      # CPU: dispatch layers only (CI)

A 512x512 NF4 weight and one row of activations, so that the GPU never backs up and back-to-back calls
time the host alone (time.perf_counter per call, after warm-up). Each row adds one layer on top of the
previous: the gemv's launch wrapper (Triton's launch, the output allocation), ``run_plan`` (output allocation, arguments), ``nf4_linear``
(argument checks, plan lookup), the dispatcher op ``torch.ops.nf4compile.linear`` and ``F.linear`` on the
NF4Tensor subclass; bf16 ``F.linear`` and an empty op defined both ways (``torch.library.Library`` and
``torch.library.custom_op``) for scale. On the CPU the kernel rows are left out and the op runs the
plain-PyTorch implementation (its compute included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nf4compile import to_nf4

N = K = 512


def per_call_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(max(calls // 10, 3)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    if device.type == "cuda":
        torch.cuda.synchronize()
    return host


def empty_ops(out: torch.Tensor, key: str):
    """The same empty op (returns a preallocated tensor) defined with Library and with custom_op."""
    library = torch.library.Library("nf4compile_probe", "FRAGMENT")
    library.define("noop(Tensor x, SymInt a, SymInt b, Tensor? bias=None, bool flag=False) -> Tensor")
    library.impl("noop", lambda x, a, b, bias=None, flag=False: out, key)

    @torch.library.custom_op("nf4compile_probe::custom_noop", mutates_args=())
    def custom_noop(x: torch.Tensor, a: int, b: int, bias: torch.Tensor | None = None, flag: bool = False) -> torch.Tensor:
        return out

    return library, torch.ops.nf4compile_probe.noop, custom_noop


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weight = to_nf4(torch.randn(N, K, device=device, dtype=torch.bfloat16))
    x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
    dense = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    op_args = (x, weight.packed, weight.absmax, weight.nested_absmax, weight.offset, weight.block_size, N, K)
    rows: dict[str, float] = {}
    run = lambda name, fn: rows.__setitem__(name, per_call_us(fn, args.calls, device))
    if device.type == "cuda":
        from nf4compile.ops import triton_linear

        kernel_args = (*op_args, None, False)
        plan = triton_linear.plan_for(*kernel_args)
        if plan["path"] == "gemv":
            run("nf4_gemv (Triton launch, output alloc)", lambda: triton_linear.nf4_gemv(*kernel_args[:-1], plan["config"]))
        run("+ run_plan", lambda: triton_linear.run_plan(plan, *kernel_args))
        run("+ nf4_linear (checks, plan lookup)", lambda: triton_linear.nf4_linear(*op_args))
    run("torch.ops.nf4compile.linear", lambda: torch.ops.nf4compile.linear(*op_args))
    run("F.linear(x, NF4Tensor)", lambda: F.linear(x, weight))
    run("bf16 F.linear", lambda: F.linear(x, dense))
    run("torch.empty", lambda: torch.empty(1, N, device=device, dtype=x.dtype))
    out = torch.empty(1, N, device=device, dtype=x.dtype)
    _library, library_noop, custom_noop = empty_ops(out, "CUDA" if device.type == "cuda" else "CPU")
    run("empty op, torch.library.Library", lambda: library_noop(x, 1, 2))
    run("empty op, torch.library.custom_op", lambda: custom_noop(x, 1, 2))
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  shape=[N, K], M=1, calls=args.calls, us_per_call=rows)
    if device.type == "cuda":
        result["plan"] = plan
    for name, value in rows.items():
        print(f"{name:40s} {value:8.2f} us")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"host-overhead-{device.type}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
