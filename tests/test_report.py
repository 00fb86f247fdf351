"""nf4compile.report: per-layer bytes and errors, whole-model KL / top-1, table, JSON and PNG."""

import copy
import importlib.util
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import nf4compile


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    return nf4compile.quantize(copy.deepcopy(reference)), reference


def test_without_reference_reports_bytes_and_says_what_it_cannot(llama_pair):
    model, _ = llama_pair
    report = nf4compile.report(model)
    assert [r.name for r in report.layers][-1] == "lm_head" and len(report.layers) == 15
    q_proj = report.layers[0]
    assert (q_proj.shape, q_proj.block_size, q_proj.double_quant, q_proj.bytes_before) == ((64, 64), 64, True, 64 * 64 * 2)
    assert q_proj.bytes_after == model.model.layers[0].self_attn.q_proj.weight.nbytes_quantized()
    assert all(r.weight_rel_error is None for r in report.layers)
    assert "no reference_model" in report.notes[0] and "no reference_model" in str(report)


def test_with_reference_and_inputs(llama_pair, tmp_path):
    model, reference = llama_pair
    ids = torch.randint(0, 256, (2, 12))
    report = nf4compile.report(model, reference, ids)
    layers = {r.name: r for r in report.layers}
    down = layers["model.layers.1.mlp.down_proj"]
    w, q = reference.model.layers[1].mlp.down_proj.weight.float(), model.model.layers[1].mlp.down_proj.weight
    expected = ((q.dequantize(torch.float32) - w).norm() / w.norm()).item()
    assert math.isclose(down.weight_rel_error, expected, rel_tol=1e-5)
    assert math.isclose(down.weight_sqnr_db, -20 * math.log10(expected), rel_tol=1e-5)
    for r in report.layers:
        if r.quantized:
            assert 0.05 < r.weight_rel_error < 0.15 and 0.05 < r.output_rel_error < 0.15, r
            assert r.output_rel_error_in_model >= r.output_rel_error * 0.9, "upstream error adds up"
    assert layers["lm_head"].weight_rel_error == 0 and layers["lm_head"].weight_sqnr_db is None
    assert layers["lm_head"].output_rel_error == 0 and layers["lm_head"].output_rel_error_in_model > 0
    assert report.model["logit_kl"] > 0 and 0 < report.model["top1_agreement"] <= 1

    data = json.loads(report.to_json(tmp_path / "report.json"))
    assert data == json.loads((tmp_path / "report.json").read_text()) and len(data["layers"]) == 15
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "top-1 agreement" in text
    if importlib.util.find_spec("matplotlib"):
        assert report.plot(tmp_path / "report.png").stat().st_size > 10_000


def test_flags_the_layer_nf4_hurts_most():
    """Large weights on dead input channels set every block's scale: the weights that matter round to zero."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)).eval()
    with torch.no_grad():
        reference[0].weight[:, 32:] *= 100
    x = torch.randn(16, 64)
    x[:, 32:] = 0
    model = nf4compile.quantize(copy.deepcopy(reference))
    report = nf4compile.report(model, reference, x)
    assert [r.sensitive for r in report.layers] == [True, False, False], str(report)
    assert report.layers[0].output_rel_error > 0.5 and report.layers[0].weight_rel_error < 0.15
    assert "logit_kl" in report.model  # a plain tensor output is taken as logits


def test_cli_report_of_a_dense_and_an_nf4_folder(llama_pair, tmp_path, capsys):
    from nf4compile.__main__ import main

    model, reference = llama_pair
    reference.save_pretrained(tmp_path / "dense")
    main(["report", str(tmp_path / "dense"), "--tokens", "8", "--json", str(tmp_path / "dense.json")])
    dense = json.loads((tmp_path / "dense.json").read_text())
    assert dense["model"]["top1_agreement"] > 0 and dense["layers"][0]["weight_rel_error"] > 0
    nf4compile.save_pretrained(model, tmp_path / "nf4")
    main(["report", str(tmp_path / "nf4"), "--reference", str(tmp_path / "dense"), "--tokens", "8"])
    assert "logit KL" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["report"], ["bench"], ["bench", "e2e"]])
def test_cli_help(command, capsys):
    from nf4compile.__main__ import main

    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0 and "usage:" in capsys.readouterr().out
