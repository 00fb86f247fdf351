"""How long calibrated NF4 takes for a 7B model on one GPU: scale search and GPTQ on Llama-2-7B's layers.

    PYTHONPATH=. python bench/calibrate_speed.py --out bench/results      # CUDA
    PYTHONPATH=. python bench/calibrate_speed.py --small --out /tmp/c     # CPU, tiny shapes (CI)

One decoder layer's seven linears (q, k, v, o: 4096x4096; gate, up: 11008x4096; down: 4096x11008), random
weights (std 0.02) and, per layer, H = XᵀX of 512 random tokens (what collect_hessians accumulates), block
64, fp32 math as nf4compile.calibrate runs it. Timed per linear (device synchronized): scale search without
data, scale search with H, and GPTQ with the searched scales; the whole model's time is 32 times one decoder
layer's (the 32 layers have these shapes). Not timed: the passes over the calibration data (collecting H,
and with keep_budget one pass per layer), which depend on how much data there is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import triton

from nf4compile.calibrate import gptq_codes, search_scales

LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
         "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
SMALL_LAYER = {"q_proj": (128, 256), "down_proj": (256, 384)}
LAYERS = 32
BLOCK = 64
TOKENS = 512


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    for name, (out_features, in_features) in (SMALL_LAYER if args.small else LAYER).items():
        weight = torch.randn(out_features, in_features, device=device, generator=generator) * 0.02
        x = torch.randn(TOKENS, in_features, device=device, generator=generator)
        hessian = x.T @ x
        search_scales(weight[:64], BLOCK)  # first CUDA calls (context, kernels) outside the timings
        _, no_data_s = timed(lambda: search_scales(weight, BLOCK), device)
        scales, with_h_s = timed(lambda: search_scales(weight, BLOCK, hessian), device)
        _, gptq_s = timed(lambda: gptq_codes(weight, hessian, scales, BLOCK), device)
        rows.append(dict(layer=name, shape=[out_features, in_features], scale_search_s=no_data_s,
                         scale_search_with_h_s=with_h_s, gptq_s=gptq_s))
        print(json.dumps(rows[-1]), flush=True)
    per_layer = {key: sum(r[key] for r in rows) for key in ("scale_search_s", "scale_search_with_h_s", "gptq_s")}
    result = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model="Llama-2-7B shapes" if not args.small else "small", block_size=BLOCK, tokens_for_h=TOKENS, rows=rows,
        per_decoder_layer_s=per_layer,
        whole_model_s={
            "scale search, no data": LAYERS * per_layer["scale_search_s"],
            "scale search with H": LAYERS * per_layer["scale_search_with_h_s"],
            "GPTQ + scale search": LAYERS * (per_layer["scale_search_with_h_s"] + per_layer["gptq_s"]),
        },
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"calibrate-speed-{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["whole_model_s"]), f"-> {path}")
    return result


if __name__ == "__main__":
    main()
