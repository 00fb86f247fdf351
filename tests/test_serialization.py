"""Save/load in bitsandbytes' layout: ours <-> bitsandbytes, round trips, and corrupt checkpoints."""

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nf4compile
from nf4compile import CheckpointError, NF4Config, NF4Tensor

from helpers import TinyLM, assert_refused_unchanged, quantized_names


def quantized_tinylm(double_quant=True, block_size=64):
    return nf4compile.quantize(TinyLM().bfloat16(), NF4Config(block_size=block_size, double_quant=double_quant))


def quant_state(sd, key):
    return json.loads(bytes(sd[key + ".quant_state.bitsandbytes__nf4"].tolist()))


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_uses_bitsandbytes_keys(double_quant):
    sd = quantized_tinylm(double_quant).state_dict()
    up_keys = sorted(k for k in sd if k.startswith("up."))
    expected = ["up.bias", "up.weight", "up.weight.absmax", "up.weight.quant_map", "up.weight.quant_state.bitsandbytes__nf4"]
    if double_quant:
        expected += ["up.weight.nested_absmax", "up.weight.nested_quant_map"]
    assert up_keys == sorted(expected)
    assert sd["up.weight"].shape == (96 * 64 // 2, 1) and sd["up.weight"].dtype == torch.uint8
    assert sd["up.weight.absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
    qs = quant_state(sd, "up.weight")
    assert {k: qs[k] for k in ("quant_type", "blocksize", "dtype", "shape")} == {
        "quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [96, 64]
    }
    assert ("nested_offset" in qs) == double_quant
    assert sd["lm_head.weight"].dtype == torch.bfloat16  # sensitive: dense


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("skeleton_device", ["cpu", "meta"])
def test_save_load_round_trip(tmp_path, double_quant, skeleton_device):
    model = quantized_tinylm(double_quant)
    path = tmp_path / "model.safetensors"
    nf4compile.save(model, path)
    with torch.device(skeleton_device):
        skeleton = TinyLM().bfloat16()
    nf4compile.load(skeleton, path)
    assert quantized_names(skeleton) == ["down", "small", "up"]
    assert not skeleton.up.weight.requires_grad and skeleton.up.bias.requires_grad
    ids = torch.randint(0, 50, (2, 5))
    assert torch.equal(skeleton(ids), model(ids))
    nf4compile.save(skeleton, tmp_path / "again.safetensors")  # the loaded model writes the same file
    first, second = load_file(path), load_file(tmp_path / "again.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_tied_weights_are_written_once_and_tied_again_on_load(tmp_path):
    model = nf4compile.quantize(TinyLM(tie=True))
    nf4compile.save(model, tmp_path / "tied.safetensors")
    assert "lm_head.weight" not in load_file(tmp_path / "tied.safetensors")
    with torch.device("meta"):
        skeleton = TinyLM(tie=True)
    nf4compile.load(skeleton, tmp_path / "tied.safetensors")
    assert skeleton.lm_head.weight is skeleton.embed.weight
    assert skeleton.embed.weight.device.type == "cpu"


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_reads_our_checkpoint_exactly(tmp_path, double_quant):
    model = quantized_tinylm(double_quant)
    nf4compile.save(model, tmp_path / "ours.safetensors")
    sd = load_file(tmp_path / "ours.safetensors")
    for name in ("up", "down", "small"):
        prefix = f"{name}.weight"
        qs = bnbF.QuantState.from_dict(
            {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}, device="cpu"
        )
        bnb_dense = bnbF.dequantize_4bit(sd[prefix], qs)
        assert torch.equal(bnb_dense, getattr(model, name).weight.dequantize())
    # and bitsandbytes' own module, loaded the way transformers loads it, computes the same layer
    layer = bnb.nn.Linear4bit(64, 96, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=double_quant)
    stats = {k: v for k, v in sd.items() if k.startswith("up.weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["up.weight"], stats, requires_grad=False, device="cpu")
    layer.bias = nn.Parameter(sd["up.bias"])
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), model.up(x), rtol=2e-2, atol=2e-2)


class Bnb4bitModel(nn.Module):
    def __init__(self, double_quant, block_size=64):
        super().__init__()
        kw = dict(compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=double_quant)
        self.up = bnb.nn.Linear4bit(64, 96, **kw)
        self.down = bnb.nn.Linear4bit(96, 64, bias=False, **kw)
        self.odd = bnb.nn.Linear4bit(33, 17, **kw)  # blocks span rows, odd element count
        for layer in (self.up, self.down, self.odd):
            layer.weight.blocksize = block_size


class DenseTwin(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96, dtype=torch.bfloat16)
        self.down = nn.Linear(96, 64, bias=False, dtype=torch.bfloat16)
        self.odd = nn.Linear(33, 17, dtype=torch.bfloat16)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block_size", [64, 128])
def test_we_read_a_bitsandbytes_checkpoint_exactly(tmp_path, double_quant, block_size):
    dense = DenseTwin()
    bnb_model = Bnb4bitModel(double_quant, block_size)
    bnb_model.load_state_dict(dense.state_dict())
    bnb_model = bnb_model.to("cpu")  # bitsandbytes quantizes on the move to a device
    save_file({k: v.contiguous() for k, v in bnb_model.state_dict().items()}, tmp_path / "bnb.safetensors")
    with torch.device("meta"):
        skeleton = DenseTwin()
    nf4compile.load(skeleton, tmp_path / "bnb.safetensors")
    for name in ("up", "down", "odd"):
        ours, theirs = getattr(skeleton, name).weight, getattr(bnb_model, name).weight
        assert isinstance(ours, NF4Tensor) and ours.block_size == block_size
        assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(theirs.data, theirs.quant_state))


def test_load_state_dict_on_a_quantized_model_accepts_bitsandbytes_keys():
    source, target = quantized_tinylm(), quantized_tinylm()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.up.weight.dequantize(), source.up.weight.dequantize())
    assert isinstance(target.up.weight, NF4Tensor)


def test_sensitive_layers_arriving_in_nf4_are_loaded_dense_unless_asked(tmp_path):
    model = nf4compile.quantize(TinyLM().bfloat16(), NF4Config(keep_sensitive=False))
    assert isinstance(model.lm_head.weight, NF4Tensor)
    nf4compile.save(model, tmp_path / "all.safetensors")
    dense_head = nf4compile.load(TinyLM().bfloat16(), tmp_path / "all.safetensors")
    assert not isinstance(dense_head.lm_head.weight, NF4Tensor)
    assert torch.equal(dense_head.lm_head.weight, model.lm_head.weight.dequantize())
    kept = nf4compile.load(TinyLM().bfloat16(), tmp_path / "all.safetensors", keep_sensitive=False)
    assert isinstance(kept.lm_head.weight, NF4Tensor)


def corrupt_cases():
    def drop(key):
        return lambda sd: sd.pop(key)

    def rewrite_quant_state(**changes):
        def apply(sd):
            key = "up.weight.quant_state.bitsandbytes__nf4"
            qs = {**json.loads(bytes(sd[key].tolist())), **changes}
            sd[key] = torch.tensor(list(json.dumps(qs).encode()), dtype=torch.uint8)

        return apply

    return [
        (drop("up.weight.absmax"), r"up\.weight\.absmax: missing from the checkpoint"),
        (drop("up.weight.nested_quant_map"), r"up\.weight: double-quantization entries are incomplete"),
        (drop("down.weight"), r"down\.weight: missing from the checkpoint"),
        (drop("norm.weight"), r"missing keys: \['norm\.weight'\]"),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), r"unexpected keys for this model: \['extra\.weight'\]"),
        (rewrite_quant_state(shape=[96, 65]), r"up\.weight: inconsistent with its quant-state \(shape \[96, 65\]"),
        (rewrite_quant_state(shape=[64, 96]), r"up\.weight: shape \[64, 96\] in the checkpoint, \[96, 64\] in the model"),
        (rewrite_quant_state(blocksize=48), r"up\.weight: inconsistent .*power of two"),
        (rewrite_quant_state(quant_type="fp4"), r"quant_type is 'fp4'"),
        (rewrite_quant_state(dtype="int8"), r"dtype 'int8'"),
        (lambda sd: sd.__setitem__("up.weight.quant_state.bitsandbytes__nf4", torch.tensor([1, 2, 255], dtype=torch.uint8)), "not valid quant-state JSON"),
        (lambda sd: sd.__setitem__("up.weight.quant_map", torch.linspace(-1, 1, 16)), "quant_map is not the NF4 codebook"),
        (lambda sd: sd.__setitem__("norm.weight", torch.ones(65)), r"norm\.weight: shape \[65\] in the checkpoint, \[64\] in the model"),
    ]


@pytest.mark.parametrize("corrupt, message", corrupt_cases())
@pytest.mark.parametrize("target", ["dense", "quantized"])
def test_corrupt_checkpoints_give_a_clear_error_and_leave_the_skeleton_unchanged(corrupt, message, target):
    sd = quantized_tinylm().state_dict()
    corrupt(sd)
    skeleton = TinyLM().bfloat16() if target == "dense" else quantized_tinylm(block_size=128)
    assert_refused_unchanged(skeleton, CheckpointError, message, lambda: nf4compile.load(skeleton, sd))


def test_a_good_checkpoint_replaces_the_nf4_weights_of_a_quantized_model():
    source = quantized_tinylm(block_size=128)
    target = nf4compile.load(quantized_tinylm(), source.state_dict())
    assert target.up.weight.block_size == 128
    assert torch.equal(target.up.weight.dequantize(), source.up.weight.dequantize())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "truncated.safetensors: not a readable safetensors file"),
        (lambda data: data[:-100], r"lies outside the file \(truncated\?\)"),
        (lambda data: data[:4], "not a readable safetensors file"),
        (lambda data: (10**9).to_bytes(8, "little") + data[8:], "header of 1000000000 bytes in a file of"),
        (lambda data: data[:8] + b"{" * 8 + data[16:], "not a readable safetensors file"),
    ],
    ids=["half", "last-tensor-cut", "four-bytes", "huge-header", "bad-json"],
)
def test_damaged_files_are_refused_from_the_header(tmp_path, damage, message):
    path = tmp_path / "truncated.safetensors"
    nf4compile.save(quantized_tinylm(), path)
    path.write_bytes(damage(path.read_bytes()))
    skeleton = TinyLM().bfloat16()
    assert_refused_unchanged(skeleton, CheckpointError, message, lambda: nf4compile.load(skeleton, path))


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: TinyLM(dim=32).bfloat16(), r"down\.weight: shape \[64, 96\] in the checkpoint, \[32, 96\] in the model"),
        (lambda: nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64)).bfloat16(),
         r"unexpected keys for this model: \['down\.weight', 'embed\.weight'"),
    ],
    ids=["other-sizes", "other-modules"],
)
def test_wrong_architecture(tmp_path, other, message):
    nf4compile.save(quantized_tinylm(), tmp_path / "model.safetensors")
    model = other()
    assert_refused_unchanged(model, CheckpointError, message, lambda: nf4compile.load(model, tmp_path / "model.safetensors"))


def test_sharded_folders_and_indexes_that_lie(tmp_path):
    tensors = TinyLM().bfloat16().state_dict()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:3]}, tmp_path / "a.safetensors")
    save_file({n: tensors[n] for n in names[3:]}, tmp_path / "b.safetensors")
    index = {"weight_map": {**{n: "a.safetensors" for n in names[:3]}, **{n: "b.safetensors" for n in names[3:]}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = nf4compile.load(TinyLM().bfloat16(), tmp_path)  # a folder of shards
    assert torch.equal(model.up.weight, tensors["up.weight"])
    for shard, message in [("b.safetensors", f"{names[0]} is not in b.safetensors"),
                           ("gone.safetensors", "gone.safetensors: not a readable safetensors file")]:
        index["weight_map"][names[0]] = shard
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        skeleton = TinyLM().bfloat16()
        assert_refused_unchanged(skeleton, CheckpointError, message, lambda: nf4compile.load(skeleton, tmp_path))


def test_fp4_checkpoints_are_refused():
    layer = bnb.nn.Linear4bit(64, 32, quant_type="fp4").to("cpu")
    with pytest.raises(CheckpointError, match="FP4 weights are not supported"):
        nf4compile.load(nn.Linear(64, 32), layer.state_dict())
