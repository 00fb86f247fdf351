"""The custom ops: schema, fake, autograd and dispatch checks (opcheck), and their input checks."""

import pytest
import torch
from torch.library import opcheck

from nf4compile import to_nf4
from nf4compile import format as nf4_format

ops = torch.ops.nf4compile


def weight_args(q):
    return (q.packed, q.absmax, q.nested_absmax, q.offset, q.block_size)


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_dequantize(double_quant):
    q = to_nf4(torch.randn(24, 40), 32, double_quant)
    opcheck(ops.dequantize.default, weight_args(q) + ([24, 40], torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("x_at_w", [False, True])
@pytest.mark.parametrize("batch", [(3,), (2, 3)])
def test_opcheck_linear(double_quant, x_at_w, batch):
    q = to_nf4(torch.randn(24, 40), 32, double_quant)
    x = torch.randn(*batch, 24 if x_at_w else 40, requires_grad=True)
    bias = torch.randn(40 if x_at_w else 24, requires_grad=True)
    opcheck(ops.linear.default, (x,) + weight_args(q) + (24, 40, bias, x_at_w))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("batch", [(1,), (2, 3)])
def test_opcheck_linear_group(double_quant, batch):
    qs = [to_nf4(torch.randn(n, 40), 32, double_quant) for n in (24, 8, 16)]
    x = torch.randn(*batch, 40)
    biases = [torch.randn(24), None, torch.randn(16)]
    lists = [list(parts) for parts in zip(*(weight_args(q)[:4] for q in qs))]
    # Inference only (the pass makes it in graphs autograd is done with): no gradient check.
    opcheck(ops.linear_group.default, (x, *lists, 32, [24, 8, 16], 40, biases),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    out = ops.linear_group(x, *lists, 32, [24, 8, 16], 40, biases)
    separate = [ops.linear(x, *weight_args(q), n, 40, b, False) for q, n, b in zip(qs, (24, 8, 16), biases)]
    assert torch.equal(out, torch.cat(separate, dim=-1))


def test_opcheck_quantize():
    opcheck(ops.quantize.default, (torch.randn(17, 33), 64))


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_and_dequantize_match_float64_reference(double_quant):
    w = torch.randn(37, 70)
    q = to_nf4(w, 32, double_quant)
    dense64 = q.dequantize(torch.float64)
    x = torch.randn(5, 70)
    bias = torch.randn(37)
    out = ops.linear(x, *weight_args(q), 37, 70, bias, False)
    torch.testing.assert_close(out.double(), x.double() @ dense64.T + bias.double(), rtol=1e-5, atol=1e-5)
    y = torch.randn(4, 37)
    out_t = ops.linear(y, *weight_args(q), 37, 70, None, True)
    torch.testing.assert_close(out_t.double(), y.double() @ dense64, rtol=1e-5, atol=1e-5)
    assert ops.linear(x[:0], *weight_args(q), 37, 70, bias, False).shape == (0, 37)


def test_inconsistent_nf4_data_is_refused_with_a_message():
    q = to_nf4(torch.randn(24, 40), 32, True)
    with pytest.raises(RuntimeError, match="absmax has 29 entries, expected 30 blocks of 32"):
        ops.dequantize(q.packed, q.absmax[:-1], q.nested_absmax, q.offset, 32, [24, 40], torch.float32)
    with pytest.raises(RuntimeError, match="packed codes hold 480 bytes, expected 492 for 984 elements"):
        ops.dequantize(q.packed, q.absmax, q.nested_absmax, q.offset, 32, [24, 41], torch.float32)
    with pytest.raises(RuntimeError, match="double-quantized NF4 needs an offset"):
        ops.dequantize(q.packed, q.absmax, q.nested_absmax, None, 32, [24, 40], torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        ops.dequantize(q.packed, q.absmax, q.nested_absmax, q.offset, 48, [24, 40], torch.float32)
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        ops.dequantize(q.packed, q.absmax, None, None, 32, [24, 40], torch.float32)


def test_quantize_op_is_the_reference_algorithm():
    w = torch.randn(17, 33, dtype=torch.bfloat16)
    packed, absmax = ops.quantize(w, 64)
    ref_packed, ref_absmax = nf4_format.quantize_nf4(w, 64)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
