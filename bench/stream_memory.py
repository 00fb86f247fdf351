"""Peak memory of a streamed quantize: ``nf4compile.load(meta_skeleton, dense_checkpoint, config=NF4Config())``.

A Llama-shaped model (random bf16 weights, transformers' LlamaForCausalLM as the skeleton, built on the
meta device) is loaded from a dense checkpoint and quantized one tensor at a time. Measured:
  --device cpu   peak resident memory (VmHWM, reset before the load) minus the resident memory before
                 it, loading from a safetensors file (plain reads: the page cache is not ours);
  --device cuda  torch.cuda.max_memory_allocated() minus the memory allocated before, loading from a
                 bf16 state dict in CPU memory (CPU -> GPU one tensor at a time), and for comparison
                 the usual way (whole bf16 model on the GPU, then nf4compile.quantize, atomic).
Expected peak: the loaded model (NF4 layers + dense embeddings, norms, lm_head) + one bf16 tensor +
the quantizer's chunk temporaries (nf4compile.format.QUANTIZE_CHUNK elements).

    python bench/stream_memory.py --device cpu --out stream.json                     # ~160 MB model
    python bench/stream_memory.py --device cuda --shape llama-2-7b --out stream.json   # an H100, ~60 s
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "small": (1024, 2816, 6, 8, 8, 2048),  # 81 M parameters, 162 MB in bf16
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
}


def _llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=256)


def skeleton(shape: str):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(_llama_config(shape)).to(torch.bfloat16)


def random_state_dict(shape: str, device: str) -> dict[str, torch.Tensor]:
    """Random bf16 weights (made on ``device``, fast on a GPU) in CPU memory, one tensor at a time."""
    state = {}
    gen = torch.Generator(device).manual_seed(0)
    for name, param in skeleton(shape).state_dict().items():
        state[name] = (torch.randn(param.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
    return state


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        return True
    except OSError:
        return False


def _bytes(model) -> dict:
    from nf4compile import NF4Tensor

    nf4 = dense = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, NF4Tensor):
            nf4 += t.nbytes_quantized()
        else:
            dense += t.numel() * t.element_size()
    return {"nf4_weight_bytes": nf4, "dense_bytes": dense, "loaded_model_bytes": nf4 + dense}


def write_checkpoint(shape: str, path: str) -> None:
    from safetensors.torch import save_file

    save_file(random_state_dict(shape, "cpu"), path)


def measure_cpu(shape: str) -> dict:
    import nf4compile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        # Written by another process: memory this one freed would make its baseline high and the
        # load's growth look small.
        subprocess.run([sys.executable, __file__, "--shape", shape, "--write", path], check=True)
        model = skeleton(shape)
        sizes = [param.numel() * 2 for param in model.state_dict().values()]
        bf16_bytes, largest = sum(sizes), max(sizes)
        before_kb = _status_kb("VmRSS")
        exact = _reset_peak_rss()
        start = time.perf_counter()
        nf4compile.load(model, path, config=nf4compile.NF4Config())
        seconds = time.perf_counter() - start
        peak_kb = _status_kb("VmHWM")
    growth = (peak_kb - before_kb) * 1024
    return {
        "device": "cpu", "shape": shape, "source": "safetensors file", "bf16_checkpoint_bytes": bf16_bytes,
        "largest_tensor_bytes": largest, **_bytes(model), "peak_rss_growth_bytes": growth,
        "peak_over_bf16_model": growth / bf16_bytes, "peak_is_exact": exact, "seconds": seconds,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # unset: glibc's dynamic threshold
    }


def measure_cuda(shape: str) -> dict:
    import nf4compile

    state = random_state_dict(shape, "cuda")
    bf16_bytes = sum(t.nbytes for t in state.values())
    largest = max(t.nbytes for t in state.values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = nf4compile.load(skeleton(shape), state, config=nf4compile.NF4Config(), device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    streamed_peak = torch.cuda.max_memory_allocated() - before
    sizes = _bytes(model)
    # The loaded layer equals quantizing that tensor directly (on the GPU).
    name = "model.layers.0.mlp.down_proj.weight"
    direct = nf4compile.to_nf4(state[name].cuda())
    loaded = model.get_parameter(name)
    same = all(torch.equal(getattr(loaded, n), getattr(direct, n)) for n in ("packed", "absmax", "nested_absmax"))
    del model, direct, loaded
    gc.collect()
    torch.cuda.empty_cache()

    # The usual way for comparison: the whole bf16 model on the GPU, then quantize (atomic: originals
    # stay until the swap).
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dense = skeleton(shape)
    dense.load_state_dict({k: v.cuda() for k, v in state.items()}, assign=True)
    nf4compile.quantize(dense, show_progress=False)
    torch.cuda.synchronize()
    whole_peak = torch.cuda.max_memory_allocated() - before
    return {
        "device": torch.cuda.get_device_name(), "shape": shape, "source": "bf16 state dict in CPU memory",
        "bf16_checkpoint_bytes": bf16_bytes, "largest_tensor_bytes": largest, **sizes,
        "streamed_peak_bytes": streamed_peak, "streamed_seconds": seconds,
        "streamed_peak_over_loaded_plus_largest": streamed_peak / (sizes["loaded_model_bytes"] + largest),
        "whole_model_then_quantize_peak_bytes": whole_peak, "loaded_layer_equals_direct_quantize": same,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--write", metavar="PATH", help="only write the random bf16 checkpoint to PATH")
    args = parser.parse_args()
    if args.write:
        return write_checkpoint(args.shape, args.write)
    result = measure_cpu(args.shape) if args.device == "cpu" else measure_cuda(args.shape)
    import transformers

    result.update(torch=torch.__version__, transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
