"""FuseDequantMatmul, GroupSiblingLinears and KeepSensitiveBF16 on exported graphs: the printed graph before and after each pass.

Exported programs are the cheapest way to get the graphs the passes see (torch.compile's post-grad graphs
have the same ``dequantize -> permute -> mm/addmm`` shape; test_compile.py checks those end to end).
"""

import warnings

import expecttest
import pytest
import torch
from torch import nn

import nf4compile
from nf4compile import passes
from nf4compile.passes import FuseDequantMatmul, GroupSiblingLinears, KeepSensitiveBF16, module_name
from graph_utils import count, llama_program, show
from helpers import TinyLM

LINEAR = torch.ops.nf4compile.linear.default
DEQUANTIZE = torch.ops.nf4compile.dequantize.default
bf16 = torch.bfloat16


def exported(model, *args, decompositions=None):
    """The decomposed program of ``model``: the graph before the passes."""
    return torch.export.export(model, args).run_decompositions(decompositions)


def fused(ep):
    return passes.apply(ep, sensitive=())


class WeightForms(nn.Module):
    """A bare NF4 weight [48, 64] used in the matmul forms the pass must recognize."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(nf4compile.to_nf4(torch.randn(48, 64, dtype=bf16)), requires_grad=False)

    def forward(self, x, y):
        a = x @ self.w.t()  # 3-D x: matmul folds it into view -> mm -> view
        b = torch.bmm(x, self.w.t().expand(x.shape[0], 64, 48))  # the weight broadcast over the batch
        c = y @ self.w  # x @ W: nf4compile.linear with x_at_w=True
        return a, b, c


class SharedDequantize(nn.Module):
    """One explicit dequantize with users that are not ``x @ W.T``: they keep it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(nf4compile.to_nf4(torch.randn(48, 64, dtype=bf16)), requires_grad=False)

    def forward(self, x, y):
        w = self.w.dequantize()
        return x @ w.t(), w @ y, w.sum()


class TestFuseDequantMatmul(expecttest.TestCase):
    def test_linear_with_bias_3d_input(self):
        model = nf4compile.quantize(nn.Linear(64, 48).to(bf16))
        x = torch.randn(2, 5, 64, dtype=bf16)
        ep = exported(model, x)
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_bias, p_weight0, p_weight1, p_weight2, p_weight3, input
dequantize = nf4compile.dequantize(p_weight0, p_weight1, p_weight2, p_weight3, 64, [48, 64], bf16)
view = aten.view(input, [10, 64])
permute = aten.permute(dequantize, [1, 0])
addmm = aten.addmm(p_bias, view, permute)
view_1 = aten.view(addmm, [2, 5, 48])
return [view_1]""")
        after = fused(ep)
        self.assertExpectedInline(show(after.graph), """\
inputs: p_bias, p_weight0, p_weight1, p_weight2, p_weight3, input
view = aten.view(input, [10, 64])
nf4_linear = nf4compile.linear(view, p_weight0, p_weight1, p_weight2, p_weight3, 64, 48, 64, p_bias, False)
view_1 = aten.view(nf4_linear, [2, 5, 48])
return [view_1]""")
        torch.testing.assert_close(after.module()(x), model(x), rtol=0, atol=0)

    def test_linear_without_bias_2d_input_single_quant(self):
        model = nf4compile.quantize(nn.Linear(64, 48, bias=False).to(bf16), nf4compile.NF4Config(double_quant=False))
        x = torch.randn(5, 64, dtype=bf16)
        ep = exported(model, x)
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_weight0, p_weight1, input
dequantize = nf4compile.dequantize(p_weight0, p_weight1, None, None, 64, [48, 64], bf16)
permute = aten.permute(dequantize, [1, 0])
mm = aten.mm(input, permute)
return [mm]""")
        after = fused(ep)
        self.assertExpectedInline(show(after.graph), """\
inputs: p_weight0, p_weight1, input
nf4_linear = nf4compile.linear(input, p_weight0, p_weight1, None, None, 64, 48, 64, None, False)
return [nf4_linear]""")
        torch.testing.assert_close(after.module()(x), model(x), rtol=0, atol=0)

    def test_aten_linear_kept_by_decompositions(self):
        model = nf4compile.quantize(nn.Linear(64, 48).to(bf16))
        x = torch.randn(3, 64, dtype=bf16)
        ep = exported(model, x, decompositions={})
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_bias, p_weight0, p_weight1, p_weight2, p_weight3, input
dequantize = nf4compile.dequantize(p_weight0, p_weight1, p_weight2, p_weight3, 64, [48, 64], bf16)
linear = aten.linear(input, dequantize, p_bias)
return [linear]""")
        self.assertExpectedInline(show(fused(ep).graph), """\
inputs: p_bias, p_weight0, p_weight1, p_weight2, p_weight3, input
nf4_linear = nf4compile.linear(input, p_weight0, p_weight1, p_weight2, p_weight3, 64, 48, 64, p_bias, False)
return [nf4_linear]""")

    def test_matmul_forms(self):
        model = WeightForms()
        x, y = torch.randn(3, 5, 64, dtype=bf16), torch.randn(4, 48, dtype=bf16)
        ep = exported(model, x, y)
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_w0, p_w1, p_w2, p_w3, x, y
dequantize = nf4compile.dequantize(p_w0, p_w1, p_w2, p_w3, 64, [48, 64], bf16)
permute = aten.permute(dequantize, [1, 0])
view = aten.view(x, [15, 64])
mm = aten.mm(view, permute)
view_1 = aten.view(mm, [3, 5, 48])
dequantize_1 = nf4compile.dequantize(p_w0, p_w1, p_w2, p_w3, 64, [48, 64], bf16)
permute_1 = aten.permute(dequantize_1, [1, 0])
expand = aten.expand(permute_1, [3, 64, 48])
bmm = aten.bmm(x, expand)
dequantize_2 = nf4compile.dequantize(p_w0, p_w1, p_w2, p_w3, 64, [48, 64], bf16)
mm_1 = aten.mm(y, dequantize_2)
return [view_1, bmm, mm_1]""")
        after = fused(ep)
        self.assertExpectedInline(show(after.graph), """\
inputs: p_w0, p_w1, p_w2, p_w3, x, y
view = aten.view(x, [15, 64])
nf4_linear = nf4compile.linear(view, p_w0, p_w1, p_w2, p_w3, 64, 48, 64, None, False)
view_1 = aten.view(nf4_linear, [3, 5, 48])
nf4_linear_1 = nf4compile.linear(x, p_w0, p_w1, p_w2, p_w3, 64, 48, 64, None, False)
nf4_linear_2 = nf4compile.linear(y, p_w0, p_w1, p_w2, p_w3, 64, 48, 64, None, True)
return [view_1, nf4_linear_1, nf4_linear_2]""")
        for got, want in zip(after.module()(x, y), model(x, y)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_dequantize_with_other_users_stays_for_them(self):
        model = SharedDequantize()
        x, y = torch.randn(5, 64, dtype=bf16), torch.randn(64, 3, dtype=bf16)
        ep = exported(model, x, y)
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_w0, p_w1, p_w2, p_w3, x, y
dequantize = nf4compile.dequantize(p_w0, p_w1, p_w2, p_w3, 64, [48, 64], bf16)
permute = aten.permute(dequantize, [1, 0])
mm = aten.mm(x, permute)
mm_1 = aten.mm(dequantize, y)
sum = aten.sum.dim_IntList(dequantize, [])
return [mm, mm_1, sum]""")
        after = fused(ep)
        self.assertExpectedInline(show(after.graph), """\
inputs: p_w0, p_w1, p_w2, p_w3, x, y
dequantize = nf4compile.dequantize(p_w0, p_w1, p_w2, p_w3, 64, [48, 64], bf16)
nf4_linear = nf4compile.linear(x, p_w0, p_w1, p_w2, p_w3, 64, 48, 64, None, False)
mm = aten.mm(dequantize, y)
sum = aten.sum.dim_IntList(dequantize, [])
return [nf4_linear, mm, sum]""")
        for got, want in zip(after.module()(x, y), model(x, y)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_tied_lm_head_and_norm_are_left_alone(self):
        model = nf4compile.quantize(TinyLM(tie=True).to(bf16))  # lm_head tied to the embedding: dense
        ids = torch.randint(0, 50, (2, 6))
        ep = exported(model, ids, decompositions={})
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_embed_weight, p_norm_weight, p_norm_bias, p_up_bias, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, p_small_bias, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, p_lm_head_weight, ids
embedding = aten.embedding(p_lm_head_weight, ids)
layer_norm = aten.layer_norm(embedding, [64], p_norm_weight, p_norm_bias, 1e-05, False)
dequantize = nf4compile.dequantize(p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, 64, [96, 64], bf16)
linear = aten.linear(layer_norm, dequantize, p_up_bias)
relu = aten.relu(linear)
dequantize_1 = nf4compile.dequantize(p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, 64, [64, 96], bf16)
linear_1 = aten.linear(relu, dequantize_1)
add = aten.add.Tensor(layer_norm, linear_1)
linear_2 = aten.linear(add, p_lm_head_weight)
dequantize_2 = nf4compile.dequantize(p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, 64, [4, 64], bf16)
linear_3 = aten.linear(add, dequantize_2, p_small_bias)
sum = aten.sum.dim_IntList(linear_3, [-1], True)
add_1 = aten.add.Tensor(linear_2, sum)
return [add_1]""")
        after = fused(ep)
        self.assertExpectedInline(show(after.graph), """\
inputs: p_embed_weight, p_norm_weight, p_norm_bias, p_up_bias, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, p_small_bias, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, p_lm_head_weight, ids
embedding = aten.embedding(p_lm_head_weight, ids)
layer_norm = aten.layer_norm(embedding, [64], p_norm_weight, p_norm_bias, 1e-05, False)
nf4_linear = nf4compile.linear(layer_norm, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, 64, 96, 64, p_up_bias, False)
relu = aten.relu(nf4_linear)
nf4_linear_1 = nf4compile.linear(relu, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, 64, 64, 96, None, False)
add = aten.add.Tensor(layer_norm, nf4_linear_1)
linear = aten.linear(add, p_lm_head_weight)
nf4_linear_2 = nf4compile.linear(add, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, 64, 4, 64, p_small_bias, False)
sum = aten.sum.dim_IntList(nf4_linear_2, [-1], True)
add_1 = aten.add.Tensor(linear, sum)
return [add_1]""")
        torch.testing.assert_close(after.module()(ids), model(ids), rtol=0, atol=0)

    def test_llama(self):
        model, ep = llama_program()
        self.assertExpectedInline(show(ep.graph, nf4_only=True), """\
dequantize = nf4compile.dequantize(p_model_layers_0_self_attn_q_proj_weight0, p_model_layers_0_self_attn_q_proj_weight1, p_model_layers_0_self_attn_q_proj_weight2, p_model_layers_0_self_attn_q_proj_weight3, 64, [64, 64], bf16)
permute = aten.permute(dequantize, [1, 0])
mm = aten.mm(view, permute)
dequantize_1 = nf4compile.dequantize(p_model_layers_0_self_attn_k_proj_weight0, p_model_layers_0_self_attn_k_proj_weight1, p_model_layers_0_self_attn_k_proj_weight2, p_model_layers_0_self_attn_k_proj_weight3, 64, [32, 64], bf16)
permute_2 = aten.permute(dequantize_1, [1, 0])
mm_1 = aten.mm(view_3, permute_2)
dequantize_2 = nf4compile.dequantize(p_model_layers_0_self_attn_v_proj_weight0, p_model_layers_0_self_attn_v_proj_weight1, p_model_layers_0_self_attn_v_proj_weight2, p_model_layers_0_self_attn_v_proj_weight3, 64, [32, 64], bf16)
permute_4 = aten.permute(dequantize_2, [1, 0])
mm_2 = aten.mm(view_6, permute_4)
bmm = aten.bmm(view_11, view_12)
bmm_1 = aten.bmm(view_14, view_15)
dequantize_3 = nf4compile.dequantize(p_model_layers_0_self_attn_o_proj_weight0, p_model_layers_0_self_attn_o_proj_weight1, p_model_layers_0_self_attn_o_proj_weight2, p_model_layers_0_self_attn_o_proj_weight3, 64, [64, 64], bf16)
permute_10 = aten.permute(dequantize_3, [1, 0])
expand_10 = aten.expand(permute_10, [sym_size_int, 64, 64])
view_20 = aten.view(expand_10, [sym_size_int, 64, 64])
bmm_2 = aten.bmm(view_19, view_20)
dequantize_4 = nf4compile.dequantize(p_model_layers_0_mlp_gate_proj_weight0, p_model_layers_0_mlp_gate_proj_weight1, p_model_layers_0_mlp_gate_proj_weight2, p_model_layers_0_mlp_gate_proj_weight3, 64, [128, 64], bf16)
permute_11 = aten.permute(dequantize_4, [1, 0])
mm_3 = aten.mm(view_22, permute_11)
dequantize_5 = nf4compile.dequantize(p_model_layers_0_mlp_up_proj_weight0, p_model_layers_0_mlp_up_proj_weight1, p_model_layers_0_mlp_up_proj_weight2, p_model_layers_0_mlp_up_proj_weight3, 64, [128, 64], bf16)
permute_12 = aten.permute(dequantize_5, [1, 0])
mm_4 = aten.mm(view_24, permute_12)
dequantize_6 = nf4compile.dequantize(p_model_layers_0_mlp_down_proj_weight0, p_model_layers_0_mlp_down_proj_weight1, p_model_layers_0_mlp_down_proj_weight2, p_model_layers_0_mlp_down_proj_weight3, 64, [64, 128], bf16)
permute_13 = aten.permute(dequantize_6, [1, 0])
mm_5 = aten.mm(view_26, permute_13)
mm_6 = aten.mm(view_28, permute_14)""")
        after = fused(ep)
        self.assertExpectedInline(show(after.graph, nf4_only=True), """\
nf4_linear = nf4compile.linear(view, p_model_layers_0_self_attn_q_proj_weight0, p_model_layers_0_self_attn_q_proj_weight1, p_model_layers_0_self_attn_q_proj_weight2, p_model_layers_0_self_attn_q_proj_weight3, 64, 64, 64, None, False)
nf4_linear_1 = nf4compile.linear(view_3, p_model_layers_0_self_attn_k_proj_weight0, p_model_layers_0_self_attn_k_proj_weight1, p_model_layers_0_self_attn_k_proj_weight2, p_model_layers_0_self_attn_k_proj_weight3, 64, 32, 64, None, False)
nf4_linear_2 = nf4compile.linear(view_6, p_model_layers_0_self_attn_v_proj_weight0, p_model_layers_0_self_attn_v_proj_weight1, p_model_layers_0_self_attn_v_proj_weight2, p_model_layers_0_self_attn_v_proj_weight3, 64, 32, 64, None, False)
bmm = aten.bmm(view_11, view_12)
bmm_1 = aten.bmm(view_14, view_15)
nf4_linear_3 = nf4compile.linear(view_19, p_model_layers_0_self_attn_o_proj_weight0, p_model_layers_0_self_attn_o_proj_weight1, p_model_layers_0_self_attn_o_proj_weight2, p_model_layers_0_self_attn_o_proj_weight3, 64, 64, 64, None, False)
nf4_linear_4 = nf4compile.linear(view_21, p_model_layers_0_mlp_gate_proj_weight0, p_model_layers_0_mlp_gate_proj_weight1, p_model_layers_0_mlp_gate_proj_weight2, p_model_layers_0_mlp_gate_proj_weight3, 64, 128, 64, None, False)
nf4_linear_5 = nf4compile.linear(view_23, p_model_layers_0_mlp_up_proj_weight0, p_model_layers_0_mlp_up_proj_weight1, p_model_layers_0_mlp_up_proj_weight2, p_model_layers_0_mlp_up_proj_weight3, 64, 128, 64, None, False)
nf4_linear_6 = nf4compile.linear(view_25, p_model_layers_0_mlp_down_proj_weight0, p_model_layers_0_mlp_down_proj_weight1, p_model_layers_0_mlp_down_proj_weight2, p_model_layers_0_mlp_down_proj_weight3, 64, 64, 128, None, False)
mm = aten.mm(view_27, permute_7)""")
        assert count(after.graph, LINEAR) == 7 and count(after.graph, DEQUANTIZE) == 0

    def test_fuse_switch(self):
        model = nf4compile.quantize(nn.Linear(64, 48).to(bf16))
        ep = exported(model, torch.randn(3, 64, dtype=bf16))
        assert count(passes.apply(ep, fuse=False).graph, LINEAR) == 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NF4COMPILE_FUSE", "0")
            assert count(passes.apply(ep).graph, LINEAR) == 0
        assert count(passes.apply(ep).graph, LINEAR) == 1
        assert count(ep.graph, DEQUANTIZE) == 1, "the caller's program is never edited"

    def test_fp16_and_fp32(self):
        for dtype in (torch.float16, torch.float32):
            model = nf4compile.quantize(nn.Linear(64, 48).to(dtype))
            x = torch.randn(2, 3, 64, dtype=dtype)
            after = fused(exported(model, x))
            assert count(after.graph, LINEAR) == 1 and count(after.graph, DEQUANTIZE) == 0
            torch.testing.assert_close(after.module()(x), model(x), rtol=0, atol=0)

    def test_pass_returns_number_of_rewrites(self):
        model = nf4compile.quantize(nn.Linear(64, 48).to(bf16))
        ep = exported(model, torch.randn(3, 64, dtype=bf16))
        graph = ep.graph_module.graph
        assert FuseDequantMatmul()(graph) == 1
        assert FuseDequantMatmul()(graph) == 0


class Siblings(nn.Module):
    """q, k and v on one normalized input, a fourth sibling, and a linear on another input."""

    def __init__(self, bias_on_k=False):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.q, self.k, self.v, self.g = nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=bias_on_k), nn.Linear(64, 32, bias=False), nn.Linear(64, 16, bias=False)
        self.o = nn.Linear(64, 48, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h), self.v(h), self.g(h), self.o(x)


def grouped_program(x, **kwargs):
    model = nf4compile.quantize(Siblings(**kwargs).to(bf16))
    ep = fused(exported(model, x))
    return model, ep, GroupSiblingLinears()(ep.graph_module.graph)


class TestGroupSiblingLinears(expecttest.TestCase):
    def test_one_row_siblings_become_groups_of_at_most_three(self):
        x = torch.randn(1, 1, 64, dtype=bf16)
        model, ep, grouped = grouped_program(x)
        assert grouped == 3  # q, k, v: one group of three; g (a fourth sibling) and o (on x) stay alone
        ep.graph_module.recompile()
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_norm_weight, p_norm_bias, p_q_weight0, p_q_weight1, p_q_weight2, p_q_weight3, p_k_weight0, p_k_weight1, p_k_weight2, p_k_weight3, p_v_weight0, p_v_weight1, p_v_weight2, p_v_weight3, p_g_weight0, p_g_weight1, p_g_weight2, p_g_weight3, p_o_weight0, p_o_weight1, p_o_weight2, p_o_weight3, x
native_layer_norm = aten.native_layer_norm(x, [64], p_norm_weight, p_norm_bias, 1e-05)
getitem = <built-in function getitem>(native_layer_norm, 0)
view = aten.view(getitem, [1, 64])
nf4_linear_group = nf4compile.linear_group(view, [p_q_weight0, p_k_weight0, p_v_weight0], [p_q_weight1, p_k_weight1, p_v_weight1], [p_q_weight2, p_k_weight2, p_v_weight2], [p_q_weight3, p_k_weight3, p_v_weight3], 64, [64, 32, 32], 64, [None, None, None])
slice_tensor = aten.slice.Tensor(nf4_linear_group, -1, 0, 64)
slice_tensor_1 = aten.slice.Tensor(nf4_linear_group, -1, 64, 96)
slice_tensor_2 = aten.slice.Tensor(nf4_linear_group, -1, 96, 128)
view_1 = aten.view(slice_tensor, [1, 1, 64])
view_2 = aten.view(slice_tensor_1, [1, 1, 32])
view_3 = aten.view(slice_tensor_2, [1, 1, 32])
view_4 = aten.view(getitem, [1, 64])
nf4_linear = nf4compile.linear(view_4, p_g_weight0, p_g_weight1, p_g_weight2, p_g_weight3, 64, 16, 64, None, False)
view_5 = aten.view(nf4_linear, [1, 1, 16])
view_6 = aten.view(x, [1, 64])
nf4_linear_1 = nf4compile.linear(view_6, p_o_weight0, p_o_weight1, p_o_weight2, p_o_weight3, 64, 48, 64, None, False)
view_7 = aten.view(nf4_linear_1, [1, 1, 48])
return [view_1, view_2, view_3, view_5, view_7]""")
        for got, want in zip(ep.module()(x), model(x)):  # the CPU op is each linear's, concatenated
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_a_decode_batch_groups_too(self):
        x = torch.randn(8, 1, 64, dtype=bf16)
        model, ep, grouped = grouped_program(x)
        assert grouped == 3
        for got, want in zip(ep.module()(x), model(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_siblings_differing_in_bias_or_with_more_rows_stay_apart(self):
        assert grouped_program(torch.randn(1, 1, 64, dtype=bf16), bias_on_k=True)[2] == 3  # q, v and g
        assert grouped_program(torch.randn(1, 17, 64, dtype=bf16))[2] == 0  # 17 rows: prefill keeps one GEMM each


class TestKeepSensitiveBF16(expecttest.TestCase):
    def quantized_lm_head(self):
        model = nf4compile.quantize(TinyLM().to(bf16), nf4compile.NF4Config(keep_sensitive=False))
        assert isinstance(model.lm_head.weight, nf4compile.NF4Tensor)
        return model

    def test_exported_program_gets_a_dense_lm_head(self):
        model = self.quantized_lm_head()
        ids = torch.randint(0, 50, (2, 6))
        ep = exported(model, ids, decompositions={})
        self.assertExpectedInline(show(ep.graph), """\
inputs: p_embed_weight, p_norm_weight, p_norm_bias, p_up_bias, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, p_small_bias, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, p_lm_head_weight0, p_lm_head_weight1, p_lm_head_weight2, p_lm_head_weight3, ids
embedding = aten.embedding(p_embed_weight, ids)
layer_norm = aten.layer_norm(embedding, [64], p_norm_weight, p_norm_bias, 1e-05, False)
dequantize = nf4compile.dequantize(p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, 64, [96, 64], bf16)
linear = aten.linear(layer_norm, dequantize, p_up_bias)
relu = aten.relu(linear)
dequantize_1 = nf4compile.dequantize(p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, 64, [64, 96], bf16)
linear_1 = aten.linear(relu, dequantize_1)
add = aten.add.Tensor(layer_norm, linear_1)
dequantize_2 = nf4compile.dequantize(p_lm_head_weight0, p_lm_head_weight1, p_lm_head_weight2, p_lm_head_weight3, 64, [50, 64], bf16)
linear_2 = aten.linear(add, dequantize_2)
dequantize_3 = nf4compile.dequantize(p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, 64, [4, 64], bf16)
linear_3 = aten.linear(add, dequantize_3, p_small_bias)
sum = aten.sum.dim_IntList(linear_3, [-1], True)
add_1 = aten.add.Tensor(linear_2, sum)
return [add_1]""")
        after = KeepSensitiveBF16({"lm_head": "produces the logits"}).on_program(ep)
        self.assertExpectedInline(show(after.graph), """\
inputs: p_embed_weight, p_norm_weight, p_norm_bias, p_up_bias, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, p_small_bias, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, p_lm_head_weight, ids
embedding = aten.embedding(p_embed_weight, ids)
layer_norm = aten.layer_norm(embedding, [64], p_norm_weight, p_norm_bias, 1e-05, False)
dequantize = nf4compile.dequantize(p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, 64, [96, 64], bf16)
linear = aten.linear(layer_norm, dequantize, p_up_bias)
relu = aten.relu(linear)
dequantize_1 = nf4compile.dequantize(p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, 64, [64, 96], bf16)
linear_1 = aten.linear(relu, dequantize_1)
add = aten.add.Tensor(layer_norm, linear_1)
linear_2 = aten.linear(add, p_lm_head_weight)
dequantize_2 = nf4compile.dequantize(p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, 64, [4, 64], bf16)
linear_3 = aten.linear(add, dequantize_2, p_small_bias)
sum = aten.sum.dim_IntList(linear_3, [-1], True)
add_1 = aten.add.Tensor(linear_2, sum)
return [add_1]""")
        signature = {spec.arg.name: spec.target for spec in after.graph_signature.input_specs}
        assert signature["p_lm_head_weight"] == "lm_head.weight"
        assert not any(key.startswith("lm_head.parametrizations") for key in after.state_dict)
        dense = after.state_dict["lm_head.weight"]
        assert isinstance(dense, nn.Parameter) and dense.dtype == bf16
        torch.testing.assert_close(dense, model.lm_head.weight.dequantize(), rtol=0, atol=0)
        torch.testing.assert_close(after.module()(ids), model(ids), rtol=0, atol=0)

    def test_apply_keeps_lm_head_dense_and_fuses_the_rest(self):
        model = self.quantized_lm_head()
        ids = torch.randint(0, 50, (2, 6))
        after = passes.apply(torch.export.export(model, (ids,)), decompositions={})
        self.assertExpectedInline(show(after.graph), """\
inputs: p_embed_weight, p_norm_weight, p_norm_bias, p_up_bias, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, p_small_bias, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, p_lm_head_weight, ids
embedding = aten.embedding(p_embed_weight, ids)
layer_norm = aten.layer_norm(embedding, [64], p_norm_weight, p_norm_bias, 1e-05, False)
nf4_linear = nf4compile.linear(layer_norm, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, 64, 96, 64, p_up_bias, False)
relu = aten.relu(nf4_linear)
nf4_linear_1 = nf4compile.linear(relu, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, 64, 64, 96, None, False)
add = aten.add.Tensor(layer_norm, nf4_linear_1)
linear = aten.linear(add, p_lm_head_weight)
nf4_linear_2 = nf4compile.linear(add, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, 64, 4, 64, p_small_bias, False)
sum = aten.sum.dim_IntList(nf4_linear_2, [-1], True)
add_1 = aten.add.Tensor(linear, sum)
return [add_1]""")

    def test_inside_compile_graphs_marks_and_warns(self):
        # An exported graph carries the same nn_module_stack metadata as dynamo's: exercise the
        # torch.compile side of the pass on it, without paying for a compile.
        model = self.quantized_lm_head()
        graph = exported(model, torch.randint(0, 50, (2, 6)), decompositions={}).graph_module.graph
        with pytest.warns(UserWarning, match=r"nf4compile: lm_head is sensitive \(produces the logits\)"):
            assert KeepSensitiveBF16({"lm_head": "produces the logits"})(graph) == 1
        assert FuseDequantMatmul()(graph) == 3  # up, down, small; not lm_head
        self.assertExpectedInline(show(graph), """\
inputs: p_embed_weight, p_norm_weight, p_norm_bias, p_up_bias, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, p_small_bias, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, p_lm_head_weight0, p_lm_head_weight1, p_lm_head_weight2, p_lm_head_weight3, ids
embedding = aten.embedding(p_embed_weight, ids)
layer_norm = aten.layer_norm(embedding, [64], p_norm_weight, p_norm_bias, 1e-05, False)
nf4_linear = nf4compile.linear(layer_norm, p_up_weight0, p_up_weight1, p_up_weight2, p_up_weight3, 64, 96, 64, p_up_bias, False)
relu = aten.relu(nf4_linear)
nf4_linear_1 = nf4compile.linear(relu, p_down_weight0, p_down_weight1, p_down_weight2, p_down_weight3, 64, 64, 96, None, False)
add = aten.add.Tensor(layer_norm, nf4_linear_1)
dequantize = nf4compile.dequantize(p_lm_head_weight0, p_lm_head_weight1, p_lm_head_weight2, p_lm_head_weight3, 64, [50, 64], bf16)
linear = aten.linear(add, dequantize)
nf4_linear_2 = nf4compile.linear(add, p_small_weight0, p_small_weight1, p_small_weight2, p_small_weight3, 64, 4, 64, p_small_bias, False)
sum = aten.sum.dim_IntList(nf4_linear_2, [-1], True)
add_1 = aten.add.Tensor(linear, sum)
return [add_1]""")

    def test_warns_once_per_layer(self):
        model = self.quantized_lm_head()
        ep = exported(model, torch.randint(0, 50, (2, 6)), decompositions={})
        keep = KeepSensitiveBF16({"lm_head": "produces the logits"})
        with pytest.warns(UserWarning):
            keep(ep.graph_module.graph)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            keep(ep.graph_module.graph)


@pytest.mark.parametrize(
    "graph_name, known, expected",
    [
        ("L['self'].lm_head", (), "lm_head"),
        ("L['self'].model.layers[0].self_attn.q_proj", (), "model.layers.0.self_attn.q_proj"),
        ("L['self']._modules['model']._modules['layers']._modules['0']", (), "model.layers.0"),
        ("getattr(L['self'].model.layers, '0').mlp", (), "model.layers.0.mlp"),
        ("L['model'].lm_head", (), "lm_head"),
        ("lm_head.parametrizations.weight.original0", (), "lm_head.weight"),
        ("parametrizations.weight.original3", (), "weight"),
        ("p_lm_head_weight", ("lm_head.weight", "model.norm.weight"), "lm_head.weight"),
        ("p_m_lm_head_weight", ("m.lm_head.weight",), "m.lm_head.weight"),
        ("L__self___model_layers_0_q_proj", ("model.layers.0.q_proj",), "model.layers.0.q_proj"),
        ("model.layers.0.mlp.up_proj", (), "model.layers.0.mlp.up_proj"),
    ],
)
def test_module_name(graph_name, known, expected):
    assert module_name(graph_name, known) == expected
