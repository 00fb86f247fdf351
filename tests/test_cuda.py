"""The core on a CUDA GPU: every op's CUDA path against the CPU reference, device moves, save/load."""

import pytest
import torch
import torch.nn.functional as F

import nf4compile
from nf4compile import NF4Config, NF4Tensor, to_nf4

from helpers import TinyLM

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(96, 64), (37, 70), (4096, 4096)])
def test_quantize_on_cuda_is_bitwise_the_cpu_result(shape, double_quant):
    w = torch.randn(shape, dtype=torch.bfloat16)
    on_cpu, on_cuda = to_nf4(w, 64, double_quant), to_nf4(w.cuda(), 64, double_quant)
    assert on_cuda.device.type == "cuda" and on_cuda.packed.device.type == "cuda"
    assert torch.equal(on_cuda.packed.cpu(), on_cpu.packed)
    if not double_quant:  # the fp32 mean behind the double-quant offset may differ in the last bit
        assert torch.equal(on_cuda.absmax.cpu(), on_cpu.absmax)
    torch.testing.assert_close(on_cuda.dequantize().cpu(), on_cpu.dequantize(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 300])
def test_linear_and_dequantize_on_cuda_match_the_cpu_reference(m, dtype, double_quant):
    q = to_nf4(torch.randn(200, 136, dtype=dtype), 64, double_quant)
    qc = q.cuda()
    assert torch.equal(qc.dequantize().cpu(), q.dequantize())
    x, bias = torch.randn(m, 136, dtype=dtype), torch.randn(200, dtype=dtype)
    ref = F.linear(x.double(), q.dequantize(torch.float64), bias.double())
    out = F.linear(x.cuda(), qc, bias.cuda())
    assert out.dtype == dtype and out.device.type == "cuda"
    rel = (out.cpu().double() - ref).norm() / ref.norm()
    assert rel < 1e-2
    y = torch.randn(m, 200, dtype=dtype)
    out_t = (y.cuda() @ qc).cpu().double()  # x @ W, the form backward uses
    ref_t = y.double() @ q.dequantize(torch.float64)
    assert (out_t - ref_t).norm() / ref_t.norm() < 1e-2


def test_module_moves_and_gpu_model_matches_cpu_model():
    model = nf4compile.quantize(TinyLM().bfloat16())
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():  # an output's autograd graph would hold the weights: no module move then
        expected = model(ids)
    model.cuda()
    assert model.up.weight.device.type == "cuda" and isinstance(model.up.weight, NF4Tensor)
    torch.testing.assert_close(model(ids.cuda()).cpu(), expected, rtol=2e-2, atol=2e-2)
    model.cpu()
    assert model.up.weight.packed.device.type == "cpu"


def test_save_on_gpu_load_on_cpu(tmp_path):
    model = nf4compile.quantize(TinyLM().bfloat16().cuda(), NF4Config(block_size=128))
    nf4compile.save(model, tmp_path / "gpu.safetensors")
    with torch.device("meta"):
        skeleton = TinyLM().bfloat16()
    nf4compile.load(skeleton, tmp_path / "gpu.safetensors")
    assert skeleton.up.weight.device.type == "cpu"
    assert torch.equal(skeleton.up.weight.dequantize(), model.up.weight.dequantize().cpu())
