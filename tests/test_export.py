"""nf4compile.export / passes.apply: fused programs, dynamic shapes, save/load, names, AOTInductor."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import nf4compile
from nf4compile import passes
from nf4compile.serialization import convert_nf4_entries, read_checkpoint
from graph_utils import count, llama_program, show
from helpers import TinyLM

LINEAR = torch.ops.nf4compile.linear.default
DEQUANTIZE = torch.ops.nf4compile.dequantize.default
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bf16 = torch.bfloat16


def tiny_lm():
    return nf4compile.quantize(TinyLM().to(bf16)), torch.randint(0, 50, (2, 6))


def test_export_is_torch_export_then_apply():
    model, ids = tiny_lm()
    ep = nf4compile.export(model, (ids,))
    assert show(ep.graph) == show(passes.apply(torch.export.export(model, (ids,))).graph)
    assert count(ep.graph, LINEAR) == 3 and count(ep.graph, DEQUANTIZE) == 0  # up, down, small
    torch.testing.assert_close(ep.module()(ids), model(ids), rtol=0, atol=0)


def test_strict_export():
    model, ids = tiny_lm()
    ep = nf4compile.export(model, (ids,), strict=True)
    assert count(ep.graph, LINEAR) == 3 and count(ep.graph, DEQUANTIZE) == 0
    torch.testing.assert_close(ep.module()(ids), model(ids), rtol=0, atol=0)


def test_sensitive_layer_in_nf4_becomes_a_dense_parameter():
    model, ids = tiny_lm()
    model.lm_head.weight = nn.Parameter(nf4compile.to_nf4(model.lm_head.weight.detach()), requires_grad=False)
    ep = nf4compile.export(model, (ids,))
    assert count(ep.graph, LINEAR) == 3 and count(ep.graph, DEQUANTIZE) == 0
    torch.testing.assert_close(ep.state_dict["lm_head.weight"], model.lm_head.weight.dequantize(), rtol=0, atol=0)
    assert nf4compile.parameter_names(ep)["lm_head.weight"] == ("lm_head.weight", None)
    # Opting out at quantize() time is respected: lm_head stays NF4, fused.
    model._nf4compile_config = nf4compile.NF4Config(keep_sensitive=False)
    assert count(nf4compile.export(model, (ids,)).graph, LINEAR) == 4


def test_program_names_map_to_a_bitsandbytes_checkpoint(tmp_path):
    model, ids = tiny_lm()
    ep = nf4compile.export(model, (ids,))
    names = nf4compile.parameter_names(ep)
    assert names["up.parametrizations.weight.original0"] == ("up.weight", "packed")
    assert names["up.parametrizations.weight.original1"] == ("up.weight", "absmax")
    assert names["up.parametrizations.weight.original2"] == ("up.weight", "nested_absmax")
    assert names["up.parametrizations.weight.original3"] == ("up.weight", "offset")
    assert names["up.bias"] == ("up.bias", None)
    nf4compile.save(model, tmp_path / "model.safetensors")
    checkpoint = convert_nf4_entries(read_checkpoint(tmp_path / "model.safetensors"))
    assert {name for name, _ in names.values()} == set(checkpoint)
    for key, value in ep.state_dict.items():
        name, inner = names[key]
        stored = getattr(checkpoint[name], inner) if inner else checkpoint[name]
        assert torch.equal(value.reshape(-1), stored.reshape(-1)), key


def test_llama_dynamic_batch_and_sequence():
    model, decomposed = llama_program()
    ep = passes.apply(decomposed)
    assert count(ep.graph, LINEAR) == 7 and count(ep.graph, DEQUANTIZE) == 0
    module = ep.module()
    for shape in [(2, 7), (3, 11), (1, 5)]:
        ids = torch.randint(0, 128, shape)
        with torch.no_grad():  # decomposed attention differs from eager SDPA by bf16 rounding
            torch.testing.assert_close(module(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)

    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert count(loaded.graph, LINEAR) == 7
    ids = torch.randint(0, 128, (4, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(ids).logits, module(ids).logits, rtol=0, atol=0)


def test_load_in_a_fresh_process_needs_only_import_nf4compile(tmp_path):
    model, ids = tiny_lm()
    ep = nf4compile.export(model, (ids,))
    torch.export.save(ep, tmp_path / "model.pt2")
    with torch.no_grad():
        torch.save((ids, model(ids)), tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import torch._inductor.config
        import nf4compile  # registers torch.ops.nf4compile.*, which the program calls
        assert torch._inductor.config.post_grad_custom_pre_pass is None, "nothing registered at import"
        assert torch._inductor.config.joint_custom_pre_pass is None
        ep = torch.export.load({str(tmp_path / "model.pt2")!r})
        ids, expected = torch.load({str(tmp_path / "io.pt")!r})
        assert "nf4compile.linear" in str(ep.graph)
        with torch.no_grad():
            assert torch.equal(ep.module()(ids), expected)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NF4COMPILE_TEST_AOTI") != "1", reason="a minute of C++ compile: NF4COMPILE_TEST_AOTI=1")
def test_aoti_package_calls_the_fused_op(tmp_path):
    model = nf4compile.quantize(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).to(bf16))
    x = torch.randn(2, 5, 64, dtype=bf16)
    ep = nf4compile.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=0, atol=0)
