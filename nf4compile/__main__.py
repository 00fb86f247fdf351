"""``python -m nf4compile demo``: quantize a small Llama, compile it, and report size, error and time."""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import nf4compile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = device == "cuda"
    config = LlamaConfig(
        hidden_size=1024 if big else 256,
        intermediate_size=2816 if big else 704,
        num_hidden_layers=4 if big else 2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192 if big else 2048,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    model = nf4compile.quantize(copy.deepcopy(reference))
    print(f"model: Llama ({config.num_hidden_layers} layers, hidden {config.hidden_size}) on {device}, "
          f"torch {torch.__version__}")
    def model_bytes(m):
        return sum(
            t.nbytes_quantized() if isinstance(t, nf4compile.NF4Tensor) else t.numel() * t.element_size()
            for t in list(m.parameters()) + list(m.buffers())
        )

    nf4_layers = [layer for layer in nf4compile.summary(model).layers if layer.quantized]
    before, after = sum(x.bytes_before for x in nf4_layers), sum(x.bytes_after for x in nf4_layers)
    print(f"{len(nf4_layers)} linear layers in NF4: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"({before / after:.2f}x smaller); whole model {model_bytes(reference) / 2**20:.1f} MiB -> "
          f"{model_bytes(model) / 2**20:.1f} MiB (embeddings, norms and lm_head stay bf16)")

    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=device)
    compiled = torch.compile(model)
    with torch.no_grad():
        start = time.perf_counter()
        logits = compiled(ids).logits.float()
        compile_s = time.perf_counter() - start
        ref_logits = reference(ids).logits.float()
        dequantized = nf4compile.dequantize_model(copy.deepcopy(model))(ids).logits.float()
        eager_ms = _median_ms(lambda: model(ids), args.repeats)
        compiled_ms = _median_ms(lambda: compiled(ids), args.repeats)
        bf16_ms = _median_ms(lambda: reference(ids), args.repeats)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"compiled NF4 vs the dequantized model: relative logit error {rel(logits, dequantized):.2e} "
          "(kernel and compiler rounding only)")
    print(f"compiled NF4 vs the original bf16 model: relative logit error {rel(logits, ref_logits):.3f}, "
          f"top-1 agreement {agree:.1%} (random weights: the quantization error itself)")
    print(f"time for {args.tokens} tokens (median of {args.repeats}): bf16 eager {bf16_ms:.1f} ms, "
          f"NF4 eager {eager_ms:.1f} ms, NF4 compiled {compiled_ms:.1f} ms (first call incl. compile {compile_s:.1f} s)")


def quantize_folder(args: argparse.Namespace) -> None:
    import nf4compile
    from nf4compile.pretrained import quantize_directory

    try:
        config = nf4compile.NF4Config(
            block_size=args.block_size, double_quant=not args.no_double_quant, method=args.method,
            keep_budget=args.keep_budget, scale_search=True if args.scale_search else None,
        )
        model = quantize_directory(args.model_dir, args.out_dir, config, args.calibrate)
    except (ValueError, TypeError, OSError) as e:
        sys.exit(f"nf4compile quantize: error: {e}")
    print(nf4compile.summary(model))
    print(f"wrote {args.out_dir} (loads with transformers' from_pretrained through bitsandbytes)")


def _dense_folder(model_dir):
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    return (model_class or transformers.AutoModel).from_pretrained(model_dir, local_files_only=True).eval()


def report_folder(args: argparse.Namespace) -> None:
    """NF4 folder (bitsandbytes 4-bit config): report it, against --reference if given. Dense folder:
    quantize a copy with the given settings and report it against the original."""
    import json
    from pathlib import Path

    import nf4compile

    try:
        config = json.loads((Path(args.model_dir) / "config.json").read_text())
        if config.get("quantization_config", {}).get("load_in_4bit"):
            model = nf4compile.from_pretrained(args.model_dir)
            reference = _dense_folder(args.reference) if args.reference else None
        else:
            reference = _dense_folder(args.model_dir)
            settings = nf4compile.NF4Config(block_size=args.block_size, double_quant=not args.no_double_quant)
            model = nf4compile.quantize(copy.deepcopy(reference), settings)
    except (ValueError, TypeError, OSError) as e:
        sys.exit(f"nf4compile report: error: {e}")
    inputs = None
    if reference is not None:
        if args.text:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            lines = [line for line in Path(args.text).read_text(encoding="utf-8").splitlines() if line.strip()]
            inputs = dict(tokenizer(lines, padding=True, truncation=True, max_length=128, return_tensors="pt"))
        else:  # random token ids: output errors on text the model never sees, but comparable between settings
            inputs = torch.randint(0, model.config.vocab_size, (2, args.tokens), generator=torch.Generator().manual_seed(0))
    result = nf4compile.report(model, reference, inputs)
    print(result)
    if args.json:
        result.to_json(args.json)
    if args.png:
        result.plot(args.png)


def bench(args: argparse.Namespace) -> None:
    """Run bench/<which>.py with the remaining arguments (the scripts live in the source tree, not the wheel)."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / BENCH_SCRIPTS[args.which]
    if not script.is_file():
        sys.exit(f"nf4compile bench: {script} not found (bench/ ships with the source repository, not the package)")
    argv, sys.argv = sys.argv, [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


# Not bench/kernels.py: with bench/ on sys.path (a script there runs) that file would stand in for the
# `kernels` package that transformers imports.
BENCH_SCRIPTS = {"kernels": "nf4_kernels.py", "e2e": "e2e.py"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nf4compile", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="quantize, compile and measure a small random-weight Llama")
    demo_parser.add_argument("--tokens", type=int, default=16)
    demo_parser.add_argument("--repeats", type=int, default=10)
    demo_parser.set_defaults(run=demo)
    quantize_parser = commands.add_parser(
        "quantize", help="quantize a local transformers model folder into one that transformers + bitsandbytes load"
    )
    quantize_parser.add_argument("model_dir")
    quantize_parser.add_argument("out_dir")
    quantize_parser.add_argument("--calibrate", metavar="TEXT_FILE", help="calibration text, one sample per line")
    quantize_parser.add_argument("--block-size", type=int, default=64)
    quantize_parser.add_argument("--no-double-quant", action="store_true")
    quantize_parser.add_argument("--method", choices=["nearest", "gptq"], default="nearest")
    quantize_parser.add_argument("--keep-budget", type=float, default=0.0, help="fraction of the NF4 bytes for dense layers")
    quantize_parser.add_argument("--scale-search", action="store_true", help="(on by default with --method gptq)")
    quantize_parser.set_defaults(run=quantize_folder)
    report_parser = commands.add_parser(
        "report", help="per-layer bytes and errors of a model folder (NF4, or dense: quantized for the report)"
    )
    report_parser.add_argument("model_dir", help="a bitsandbytes 4-bit folder, or a dense transformers folder")
    report_parser.add_argument("--reference", metavar="DENSE_DIR", help="the original model of an NF4 folder (errors need it)")
    report_parser.add_argument("--text", metavar="TEXT_FILE", help="inputs, one sample per line (default: random token ids)")
    report_parser.add_argument("--tokens", type=int, default=64, help="length of the random inputs")
    report_parser.add_argument("--block-size", type=int, default=64, help="for a dense folder")
    report_parser.add_argument("--no-double-quant", action="store_true", help="for a dense folder")
    report_parser.add_argument("--json", metavar="PATH")
    report_parser.add_argument("--png", metavar="PATH", help="per-layer error plot (needs matplotlib)")
    report_parser.set_defaults(run=report_folder)
    bench_parser = commands.add_parser(
        "bench", help="bench/nf4_kernels.py or bench/e2e.py from the source tree; `bench e2e --help` for their options"
    )
    bench_parser.add_argument("which", choices=sorted(BENCH_SCRIPTS))
    bench_parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    bench_parser.set_defaults(run=bench)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
