"""nf4compile.quantize: which layers become NF4, atomicity, Conv1D, summary, torchao's quantize_."""

import pytest
import torch
from torch import nn

import nf4compile
from nf4compile import NF4Config, NF4Tensor

from helpers import TinyLM, assert_unchanged, deepcopy, quantized_names, state


def test_defaults_quantize_linears_and_keep_sensitive_layers_dense():
    model = TinyLM().bfloat16()
    ids = torch.randint(0, 50, (2, 7))
    nf4compile.quantize(model)
    assert quantized_names(model) == ["down", "small", "up"]
    assert isinstance(model.embed.weight, nn.Parameter) and not isinstance(model.embed.weight, NF4Tensor)
    assert not isinstance(model.norm.weight, NF4Tensor) and not isinstance(model.lm_head.weight, NF4Tensor)
    assert model.up.weight.block_size == 64 and model.up.weight.double_quant
    reference = TinyLM().bfloat16()
    reference.load_state_dict(nf4compile.dequantize_model(deepcopy(model)).state_dict())
    torch.testing.assert_close(model(ids), reference(ids), rtol=2e-2, atol=2e-2)


def test_tied_weights_and_output_embeddings_stay_dense():
    model = TinyLM(tie=True)
    model.lm_head = nn.Linear(64, 50, bias=False)
    model.lm_head.weight = model.embed.weight
    model.head2 = model.lm_head  # a second name for the same module
    nf4compile.quantize(model)
    assert model.lm_head.weight is model.embed.weight
    skipped = nf4compile.summary(model).as_dict()["layers"]
    reasons = {layer["name"]: layer["reason"] for layer in skipped if not layer["quantized"]}
    assert "lm_head" in reasons["lm_head"]


def test_config_skip_include_filter_and_min_numel():
    m = nf4compile.quantize(TinyLM(), NF4Config(skip=["up"]))
    assert quantized_names(m) == ["down", "small"]
    m = nf4compile.quantize(TinyLM(), NF4Config(include=[r"d.*"]))
    assert quantized_names(m) == ["down"]
    m = nf4compile.quantize(TinyLM(), filter_fn=lambda module, name: name != "down")
    assert quantized_names(m) == ["small", "up"]
    m = nf4compile.quantize(TinyLM(), NF4Config(min_numel=1000))
    assert quantized_names(m) == ["down", "up"]
    m = nf4compile.quantize(TinyLM(), NF4Config(keep_sensitive=False, block_size=128, double_quant=False))
    assert quantized_names(m) == ["down", "lm_head", "small", "up"]
    assert m.up.weight.block_size == 128 and not m.up.weight.double_quant


def test_quantizing_twice_is_a_no_op_for_nf4_layers():
    m = nf4compile.quantize(TinyLM())
    packed = m.up.weight.packed
    nf4compile.quantize(m)
    assert m.up.weight.packed is packed


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(block_size=100), ValueError, "power of two from 32 to 4096"),
        (dict(skip="lm_head"), TypeError, "list of names"),
        (dict(min_numel=-1), ValueError, "min_numel"),
    ],
)
def test_bad_config_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        NF4Config(**kwargs)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda m: m.down.weight.data.__setitem__((3, 5), float("nan")), r"down\.weight contains NaN or Inf"),
        (lambda m: m.down.weight.data.__setitem__((0, 0), float("-inf")), r"down\.weight contains NaN or Inf"),
        (lambda m: setattr(m.down, "weight", nn.Parameter(torch.randint(0, 3, (64, 96)), requires_grad=False)), r"down\.weight has dtype torch.int64"),
        (lambda m: setattr(m.down, "weight", nn.Parameter(torch.randn(64, 96).to(torch.float8_e4m3fn), requires_grad=False)), r"down\.weight has dtype torch.float8"),
    ],
)
def test_failed_quantization_leaves_the_model_exactly_as_it_was(corrupt, message):
    model = TinyLM()
    corrupt(model)
    before = state(model)
    with pytest.raises((ValueError, TypeError), match="model left unchanged: " + message):
        nf4compile.quantize(model)
    assert_unchanged(model, before)
    assert not hasattr(model, "_nf4compile_config")


def test_meta_model_is_refused_and_unchanged():
    with torch.device("meta"):
        model = TinyLM()
    with pytest.raises(ValueError, match="meta device"):
        nf4compile.quantize(model)
    assert quantized_names(model) == []


def test_summary_reports_layers_and_bytes():
    model = nf4compile.quantize(TinyLM().bfloat16())
    s = nf4compile.summary(model)
    d = s.as_dict()
    assert d["quantized"] == 3 and d["skipped"] == 1
    up = next(layer for layer in d["layers"] if layer["name"] == "up")
    # 96*64 bf16 = 12288 B -> 3072 B codes + 96 uint8 scales + 1 fp32 nested + 4 B offset
    assert (up["bytes_before"], up["bytes_after"]) == (12288, 3072 + 96 + 4 + 4)
    text = str(s)
    assert "kept dense: lm_head (produces the logits)" in text and "3 of 4 linear layers in NF4: " in text


def test_gpt2_conv1d_is_quantized_as_out_by_in():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 9))
    dense_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: [in, out]
    nf4compile.quantize(model)
    w = model.transformer.h[0].attn.c_attn.weight
    assert isinstance(w, NF4Tensor) and w.shape == (64, 192) and w.quant_shape == (192, 64) and w.transposed
    assert (w.dequantize() - dense_attn).abs().max() < dense_attn.abs().max() * 0.2
    assert not isinstance(model.lm_head.weight, NF4Tensor)  # tied to wte
    with torch.no_grad():
        out = model(ids).logits
        reference = nf4compile.dequantize_model(deepcopy(model))(ids).logits
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert sorted(model.state_dict()["transformer.h.0.attn.c_attn.weight.absmax"].shape) == [192]


def test_torchao_quantize_applies_nf4config():
    from torchao.quantization import quantize_

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(model, NF4Config(block_size=32))
    assert isinstance(model[0].weight, NF4Tensor) and model[0].weight.block_size == 32
    assert isinstance(model[2].weight, NF4Tensor)
    x = torch.randn(3, 64)
    assert model(x).shape == (3, 8)


def test_progress_bar_can_be_forced(capsys):
    nf4compile.quantize(TinyLM(), show_progress=True)
    assert "nf4compile.quantize" in capsys.readouterr().err
