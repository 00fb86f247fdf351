"""Model folders both ways: transformers + bitsandbytes write, nf4compile.from_pretrained reads (and back).

bitsandbytes and transformers run on the CPU: each checkpoint is written in the test itself, from a
random-weight model that transformers quantizes while loading (``BitsAndBytesConfig``, nf4).
"""

import json

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, LlamaConfig

import nf4compile
from nf4compile import NF4Tensor

pytest.importorskip("accelerate", reason="transformers loads bitsandbytes models only with accelerate")

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "gpt2": lambda: GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),  # Conv1D, tied
}


def bnb_folder(tmp_path, arch, double_quant, skip=None):
    """(the model transformers + bitsandbytes loaded, the folder it saved)."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.bfloat16).save_pretrained(tmp_path / "dense")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                      bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization, device_map="cpu")
    model.save_pretrained(tmp_path / "bnb")
    # On CPUs with AVX512-BF16, bitsandbytes' forward first repacks each weight for its CPU kernel, and that repacking
    # fails on these small layers (bitsandbytes 0.50.2: "shape '[64, 2]' is invalid for input of size 160"); its
    # portable path (dequantize, then matmul) is the reference here on every CPU.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval(), tmp_path / "bnb"


def check_same_weights(theirs, ours):
    """Every bitsandbytes Linear4bit dequantizes exactly to our NF4 weight; every dense tensor is equal."""
    n4 = 0
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = ours.get_submodule(name).weight
            assert isinstance(weight, NF4Tensor), name
            expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense = weight.dequantize()
            assert torch.equal(dense.t() if weight.transposed else dense, expected), name  # Conv1D: [in, out]
            assert weight.double_quant == (module.weight.quant_state.nested is True), name
            n4 += 1
    ours_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            assert torch.equal(ours_params[name], p), name
    return n4


@pytest.mark.parametrize("arch,double_quant", [("llama", True), ("llama", False), ("gpt2", True)])
def test_transformers_bitsandbytes_folder_loads_bit_exact(tmp_path, arch, double_quant):
    theirs, folder = bnb_folder(tmp_path, arch, double_quant)
    ours = nf4compile.from_pretrained(folder)
    assert check_same_weights(theirs, ours) == (14 if arch == "llama" else 8)
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=0.03, rtol=0.02)
    if arch == "gpt2":
        assert ours.lm_head.weight is ours.transformer.wte.weight, "tied weights stay tied"


def test_our_folder_keeps_dense_what_we_kept_dense(tmp_path):
    """save_pretrained's skip list (lm_head + every layer we kept) makes transformers load exactly our layers."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"](), dtype=torch.bfloat16).eval()
    nf4compile.quantize(model, nf4compile.NF4Config(skip=["model.layers.0.mlp.down_proj"]))
    nf4compile.save_pretrained(model, tmp_path / "ours")
    skip = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert {"lm_head", "model.layers.0.mlp.down_proj"} <= set(skip)

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.down_proj) is nn.Linear and type(theirs.lm_head) is nn.Linear
    assert isinstance(theirs.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert check_same_weights(theirs, model) == 13
    back = nf4compile.from_pretrained(tmp_path / "ours")
    assert check_same_weights(theirs, back) == 13


def test_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        nf4compile.from_pretrained(tmp_path / "missing")
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no bitsandbytes load_in_4bit"):
        nf4compile.from_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="NF4 only"):
        nf4compile.from_pretrained(tmp_path / "dense")


@pytest.mark.cuda
def test_loads_onto_the_gpu(tmp_path):
    theirs, folder = bnb_folder(tmp_path, "llama", True)
    ours = nf4compile.from_pretrained(folder, device="cuda")
    assert ours.model.layers[0].mlp.up_proj.weight.packed.is_cuda
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids.cuda()).logits.cpu(), theirs(ids).logits, atol=0.05, rtol=0.02)
