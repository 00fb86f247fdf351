"""Every Triton kernel compiles for Hopper (sm_90) with the arguments its launch wrapper gives it, without a GPU.

The interpreter (test_triton_kernels.py) runs the kernels' arithmetic but not Triton's compiler, whose front end
type-checks every statement it visits: a kernel can pass every interpreter test and still fail to compile on the
first GPU it meets (a static early return that left the statements after it type-checked, with an empty sibling
slot's uint8 pointer where the first weight's was fp32, broke every fused kernel that way). Triton compiles for a
GPU target offline, so here each launch wrapper runs with its kernel swapped for a recorder, and the recorded call
is compiled to a cubin for sm_90: argument types (tensors' dtypes, which slot gets which tensor), constexprs and
launch options exactly as the wrapper passes them.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nf4compile import format as nf4_format  # noqa: E402
from nf4compile.ops import triton_dequantize, triton_linear  # noqa: E402

pytestmark = pytest.mark.skipif(triton_linear.INTERPRET, reason="the interpreter's kernels are not compiled")

HOPPER = GPUTarget("cuda", 90, 32)
_POINTEE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
            torch.int32: "i32"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")


class _Recorded(Exception):
    pass


class _Recorder:
    """Stands in for a JITFunction: records the launch (``kernel[grid](...)`` or ``kernel.warmup(...)``) and stops
    the wrapper there (what it would do after the launch needs a GPU)."""

    def __getitem__(self, grid):
        return self.warmup

    def warmup(self, *args, grid=None, **kwargs):
        raise _Recorded(args, kwargs)


def compile_launch(monkeypatch, module, kernel_name, wrapper, *args, **kwargs):
    """Runs ``wrapper(*args, **kwargs)`` with ``module.kernel_name`` recorded, then compiles the recorded launch for
    sm_90 (raising Triton's CompilationError where its front end or ptxas refuses it)."""
    kernel = getattr(module, kernel_name)
    monkeypatch.setattr(module, kernel_name, _Recorder())
    with pytest.raises(_Recorded) as recorded:
        wrapper(*args, **kwargs)
    launch_args, launch_kwargs = recorded.value.args
    values = dict(zip(kernel.arg_names, launch_args)) | launch_kwargs
    signature, constexprs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = values[name]
        if index in kernel.constexprs:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _POINTEE[value.dtype]
        else:
            assert isinstance(value, int) and not isinstance(value, bool), (name, value)
            signature[name] = "i32"
    options = {k: v for k, v in launch_kwargs.items() if k in _LAUNCH_OPTIONS}
    # Triton 3.10 flips the default (no FP fusion): a launch that relied on it would change speed or rounding.
    assert "enable_fp_fusion" in options, f"{kernel_name}'s launch leaves FP fusion to Triton's default"
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=HOPPER, options=options)


def _weight(N, K, block_size, double_quant):
    packed, absmax = nf4_format.quantize_nf4(torch.randn(N, K), block_size)
    if not double_quant:
        return packed, absmax, None, None
    return (packed, *nf4_format.double_quantize(absmax))


def _bias(n, bias):
    return torch.randn(n).to(torch.bfloat16) if bias else None


def _siblings(count, K, double_quant, bias):
    """Sibling weights as nf4_linear_group passes them: the first weight's scale format and bias use."""
    return [(*_weight(n, K, 64, double_quant), n, _bias(n, bias)) for n in (24, 8)[:count]]


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_compiles(double_quant, monkeypatch):
    weight = _weight(40, 192, 64, double_quant)
    compile_launch(monkeypatch, triton_dequantize, "_nf4_dequantize_kernel", triton_dequantize.nf4_dequantize,
                   *weight, 64, (40, 192), torch.bfloat16)


# One config of each kind a plan can name (lookups, rows, prefetch, scales, maxnreg), alone and with siblings.
@pytest.mark.parametrize("config", [triton_linear.GEMV_CONFIGS[0], triton_linear.GEMV_CONFIGS[-1],
                                    triton_linear.GEMV_ROWS_CONFIGS[0]], ids=["first", "last", "rows"])
@pytest.mark.parametrize("siblings,double_quant", [(0, True), (0, False), (2, True)])
def test_gemv_compiles(config, siblings, double_quant, monkeypatch):
    M = 1 if config in triton_linear.GEMV_CONFIGS else 4
    x = torch.randn(M, 192).to(torch.bfloat16)
    compile_launch(monkeypatch, triton_linear, "_nf4_gemv_kernel", triton_linear.nf4_gemv,
                   x, *_weight(40, 192, 64, double_quant), 64, 40, 192, _bias(40, True), config,
                   _siblings(siblings, 192, double_quant, True))


@pytest.mark.parametrize("config", [dict(num_warps=4, SPLIT_K=1, CHUNKS=1), dict(num_warps=8, SPLIT_K=4, CHUNKS=2),
                                    dict(num_warps=8, SPLIT_K=3, CHUNKS=2, scales="quad"),
                                    dict(num_warps=4, SPLIT_K=2, CHUNKS=1, scales="quad", WEIGHT_TILES=2)],
                         ids=["one-chunk", "split", "quad", "two-weight-tiles"])
@pytest.mark.parametrize("M", [3, 13])
@pytest.mark.parametrize("siblings,double_quant,bias", [(0, True, False), (0, False, True), (1, True, True), (2, True, False)])
def test_mma_gemv_compiles(config, M, siblings, double_quant, bias, monkeypatch):
    x = torch.randn(M, 192).to(torch.bfloat16)
    compile_launch(monkeypatch, triton_linear, "_nf4_mma_gemv_kernel", triton_linear.nf4_mma_gemv,
                   x, *_weight(40, 192, 64, double_quant), 64, 40, 192, _bias(40, bias), config,
                   _siblings(siblings, 192, double_quant, bias))


@pytest.mark.parametrize("config", [triton_linear.MM_CONFIGS[0], triton_linear.MM_CONFIGS[-1],
                                    next(c for c in triton_linear.MM_CONFIGS if c.get("lookup") == "pairs")],
                         ids=["first", "last", "pairs"])
@pytest.mark.parametrize("x_at_w,siblings", [(False, 0), (True, 0), (False, 2)])
def test_mm_compiles(config, x_at_w, siblings, monkeypatch):
    x = torch.randn(16, 40 if x_at_w else 192).to(torch.bfloat16)
    compile_launch(monkeypatch, triton_linear, "_nf4_mm_kernel", triton_linear.nf4_mm,
                   x, *_weight(40, 192, 64, True), 64, 40, 192, None, x_at_w, config,
                   _siblings(0 if x_at_w else siblings, 192, True, False))
