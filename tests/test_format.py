"""The NF4 reference algorithm against bitsandbytes itself (its CPU backend is the oracle)."""

import bitsandbytes.functional as bnbF
import pytest
import torch

from nf4compile import format as nf4_format

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, cols): aligned, K < block, blocks spanning rows, odd element count, one row
SHAPES = [(64, 128), (17, 33), (96, 100), (3, 5), (1, 4096), (40, 4097)]


def test_codebook_and_dynamic_map_are_bitsandbytes_tables():
    assert torch.equal(nf4_format.NF4_CODEBOOK, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4_format.DYNAMIC_MAP, bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [32, 64, 256, 4096])
def test_quantize_and_dequantize_match_bitsandbytes_bytes(shape, block_size, dtype):
    w = torch.randn(shape, dtype=dtype) * 3
    w[0, : min(shape[1], 7)] = 0  # zeros inside a block
    packed, absmax = nf4_format.quantize_nf4(w, block_size)
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(absmax, state.absmax)
    dense = nf4_format.dequantize_nf4(packed, absmax, block_size, shape, dtype)
    assert dense.dtype == dtype
    assert torch.equal(dense, bnbF.dequantize_4bit(ref_packed, state))


def test_ties_go_to_the_lower_code_and_zero_blocks_give_zero():
    mids = nf4_format.NF4_MIDPOINTS
    block = torch.cat([mids, torch.tensor([1.0]), torch.zeros(48)])  # absmax 1: values are exact midpoints
    w = torch.cat([block, torch.zeros(64)]).view(2, 64)
    packed, absmax = nf4_format.quantize_nf4(w, 64)
    codes = nf4_format.unpack_codes(packed, w.numel())
    assert codes[:15].tolist() == list(range(15))  # midpoint i -> code i (the lower one)
    assert codes[15] == 15 and (codes[16:] == nf4_format.ZERO_CODE).all()
    assert absmax.tolist() == [1.0, 0.0]
    dense = nf4_format.dequantize_nf4(packed, absmax, 64, w.shape, torch.float32)
    assert not dense.isnan().any() and (dense[1] == 0).all()
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed.view(-1))


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_reconstruction_error_is_within_half_a_code_gap(block_size):
    w = torch.randn(50, 77, dtype=torch.float64)
    packed, absmax = nf4_format.quantize_nf4(w, block_size)
    dense = nf4_format.dequantize_nf4(packed, absmax, block_size, w.shape, torch.float64)
    per_element_absmax = absmax.double().repeat_interleave(block_size)[: w.numel()].view(w.shape)
    half_gap = (nf4_format.NF4_CODEBOOK[1:] - nf4_format.NF4_CODEBOOK[:-1]).max().item() / 2
    assert ((dense - w).abs() <= per_element_absmax * half_gap * (1 + 1e-6)).all()
    rel = (dense - w).norm() / w.norm()
    assert 0.05 < rel < 0.12  # NF4 on Gaussian weights: ~0.09 relative Frobenius error


@pytest.mark.parametrize("n_blocks", [1, 7, 256, 300, 1000, 20000])
def test_double_quantization_matches_bitsandbytes(n_blocks):
    w = torch.randn(n_blocks * 64) * torch.rand(n_blocks).repeat_interleave(64) * 4
    _, absmax = nf4_format.quantize_nf4(w.view(1, -1), 64)
    codes, nested_absmax, offset = nf4_format.double_quantize(absmax)
    _, state = bnbF.quantize_4bit(w.view(1, -1), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert offset.item() == state.offset.item()
    assert torch.equal(nested_absmax, state.state2.absmax)
    assert torch.equal(codes, state.absmax)
    rebuilt = nf4_format.dequantize_absmax(codes, nested_absmax, offset)
    assert torch.equal(rebuilt, bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset)


@pytest.mark.parametrize("bad", [0, 16, 48, 100, 8192, -64, 64.0, "64", True])  # 64.0 == 64, True == 1
def test_unsupported_block_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="power of two from 32 to 4096"):
        nf4_format.check_block_size(bad)
