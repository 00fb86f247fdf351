"""NF4Tensor: a weight that quantizes like bitsandbytes and behaves like the dense weight."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nf4compile
from nf4compile import NF4Tensor, to_nf4
from nf4compile import format as nf4_format


def make(shape=(48, 40), dtype=torch.bfloat16, block_size=32, double_quant=True):
    w = torch.randn(shape, dtype=dtype)
    return w, to_nf4(w, block_size, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_to_nf4_reports_original_shape_and_dtype_and_dequantizes_like_the_reference(double_quant):
    w, q = make(double_quant=double_quant)
    assert isinstance(q, NF4Tensor) and q.shape == w.shape and q.dtype == w.dtype
    assert not q.requires_grad and q.double_quant == double_quant
    packed, absmax = nf4_format.quantize_nf4(w, 32)
    assert torch.equal(q.packed, packed)
    if double_quant:
        absmax = nf4_format.dequantize_absmax(*nf4_format.double_quantize(absmax))
    assert torch.equal(q.dequantize(), nf4_format.dequantize_nf4(packed, absmax, 32, w.shape, w.dtype))
    assert q.dequantize(torch.float32).dtype == torch.float32
    assert repr(q) == (
        f"NF4Tensor(shape=[48, 40], dtype=torch.bfloat16, block_size=32, double_quant={double_quant}, device=cpu)"
    )


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    "name, fn",
    [
        ("F.linear", lambda x, w, b: F.linear(x, w, b)),
        ("F.linear 3-D", lambda x, w, b: F.linear(x.view(2, 3, -1), w, b)),
        ("x @ w.t()", lambda x, w, b: x @ w.t()),
        ("x @ w.T 3-D", lambda x, w, b: x.view(3, 2, -1) @ w.T),
        ("torch.mm", lambda x, w, b: torch.mm(x, w.t())),
        ("torch.addmm", lambda x, w, b: torch.addmm(b, x, w.t())),
        ("torch.addmm alpha/beta", lambda x, w, b: torch.addmm(b, x, w.t(), beta=0.5, alpha=2.0)),
        ("torch.matmul", lambda x, w, b: torch.matmul(x, w.transpose(0, 1))),
        ("1-D input", lambda x, w, b: x[0] @ w.t()),
        ("w @ y", lambda x, w, b: w @ x.t()),
        ("bmm", lambda x, w, b: torch.bmm(x.view(2, 3, -1), w.t().unsqueeze(0).expand(2, -1, -1))),
        ("x @ W (no transpose)", lambda x, w, b: torch.cat([x, x], 1)[:, :48] @ w),
    ],
)
def test_every_matmul_form_gives_the_dense_answer(name, fn, double_quant):
    w, q = make(double_quant=double_quant)
    x = torch.randn(6, 40, dtype=torch.bfloat16)
    b = torch.randn(48, dtype=torch.bfloat16)
    expected = fn(x, q.dequantize(), b)
    actual = fn(x, q, b)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)


def test_eager_linear_runs_the_fused_op():
    _, q = make()
    x = torch.randn(4, 40, dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.linear(x, q)
    def ancestors(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            yield event.name

    names = [e.name for e in prof.events()]
    assert names.count("nf4compile::linear") == 1
    # any dense weight exists only inside the fused op (its plain-PyTorch CPU implementation)
    for event in prof.events():
        if event.name == "nf4compile::dequantize":
            assert "nf4compile::linear" in ancestors(event)


def test_traced_graph_has_dequantize_followed_by_the_original_op():
    lin = nn.Linear(40, 48, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(make()[1], requires_grad=False)
    ep = torch.export.export(lin, (torch.randn(2, 40, dtype=torch.bfloat16),)).run_decompositions()
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets[0] == "nf4compile.dequantize.default"
    assert "nf4compile.linear.default" not in targets
    assert targets[-1] == "aten.addmm.default"


def test_compiles_fullgraph_and_recompiles_at_most_once_for_new_batch_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    lin = nn.Linear(40, 48, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(make()[1], requires_grad=False)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lin, backend=counter, fullgraph=True)
    for m in (3, 5, 7, 11):
        x = torch.randn(m, 40, dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), lin(x), rtol=1e-2, atol=1e-2)
    assert counter.frame_count <= 2


def test_gradient_flows_to_the_input_and_bias_only():
    _, q = make()
    lin = nn.Linear(40, 48, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(q, requires_grad=False)
    x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(5, 48, dtype=torch.bfloat16)
    lin(x).backward(grad_out)
    assert lin.weight.grad is None and not lin.weight.requires_grad
    torch.testing.assert_close(lin.bias.grad, grad_out.sum(0))
    torch.testing.assert_close(x.grad, grad_out @ q.dequantize(), rtol=1e-2, atol=1e-2)


def test_gradient_matches_the_dense_reference():
    _, q = make(dtype=torch.float32)
    x = torch.randn(5, 40, requires_grad=True)
    grad_out = torch.randn(5, 48)
    F.linear(x, q).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ q.dequantize(), rtol=1e-5, atol=1e-5)


def test_as_parameter_of_linear_with_module_conversions():
    w, q = make()
    lin = nn.Linear(40, 48, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(q, requires_grad=False)
    assert isinstance(lin.weight, NF4Tensor) and isinstance(lin.weight, nn.Parameter)
    packed = lin.weight.packed.clone()
    lin.half()
    assert isinstance(lin.weight, NF4Tensor) and lin.weight.dtype == torch.float16
    assert torch.equal(lin.weight.packed, packed)  # .to(dtype) changes the compute dtype, not the codes
    x = torch.randn(2, 40, dtype=torch.float16)
    torch.testing.assert_close(lin(x), F.linear(x, q.dequantize(torch.float16), lin.bias), rtol=1e-3, atol=1e-3)
    lin.to(torch.bfloat16).cpu()
    assert lin.weight.dtype == torch.bfloat16 and lin.weight.device.type == "cpu"
    meta = lin.weight.to("meta")
    assert meta.device.type == "meta" and meta.packed.device.type == "meta"


def test_detach_clone_t_copy_and_deepcopy():
    w, q = make()
    assert q.detach().packed is q.packed
    c = q.clone()
    assert c.packed.data_ptr() != q.packed.data_ptr() and torch.equal(c.dequantize(), q.dequantize())
    t = q.t()
    assert t.shape == (40, 48) and t.transposed and torch.equal(t.dequantize(), q.dequantize().t())
    assert torch.equal(t.t().dequantize(), q.dequantize())
    d = copy.deepcopy(q)
    assert d.packed.data_ptr() != q.packed.data_ptr() and torch.equal(d.dequantize(), q.dequantize())

    target = to_nf4(torch.randn(48, 40, dtype=torch.bfloat16), 32, True)
    target.copy_(q)
    assert torch.equal(target.dequantize(), q.dequantize())
    target.copy_(w)  # a dense source is quantized in the target's format
    assert torch.equal(target.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="NF4 layouts differ"):
        target.copy_(to_nf4(w, 64, True))


@pytest.mark.parametrize("double_quant", [False, True])
def test_torch_save_load_weights_only_and_pickle(double_quant):
    _, q = make(double_quant=double_quant)
    buf = io.BytesIO()
    torch.save({"w": q}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["w"]
    assert isinstance(loaded, NF4Tensor) and torch.equal(loaded.dequantize(), q.dequantize())
    assert torch.equal(pickle.loads(pickle.dumps(q)).dequantize(), q.dequantize())


def test_unsupported_ops_name_the_op_and_how_to_dequantize():
    _, q = make()
    with pytest.raises(NotImplementedError, match=r"aten\.add\.Tensor.*weight\.dequantize\(\)"):
        q + 1
    with pytest.raises(NotImplementedError, match=r"aten\.sum"):
        q.sum()


def test_mismatched_activation_dtype_and_device_are_clear_errors():
    _, q = make()
    with pytest.raises(TypeError, match="input is torch.float32 but the NF4 weight computes in torch.bfloat16"):
        F.linear(torch.randn(2, 40), q)
    with pytest.raises(ValueError, match="input is on meta but the NF4 weight is on cpu"):
        F.linear(torch.randn(2, 40, dtype=torch.bfloat16, device="meta"), q)
    with pytest.raises(RuntimeError, match="input's last dimension is 39, expected 40"):
        F.linear(torch.randn(2, 39, dtype=torch.bfloat16), q)


@pytest.mark.parametrize(
    "weight, message",
    [
        (torch.randint(0, 5, (8, 64)), "dtype torch.int64"),
        (torch.randn(8, 64, dtype=torch.complex64), "dtype torch.complex64"),
        (torch.ones(8, 64, dtype=torch.bool), "dtype torch.bool"),
        (torch.randn(512), "2-D weights"),
        (torch.randn(2, 8, 64), "2-D weights"),
        (torch.randn(8, 64, device="meta"), "meta device"),
        (torch.tensor([[1.0, float("nan")] * 32]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")] * 32]), "NaN or Inf"),
    ],
)
def test_to_nf4_refuses_what_it_cannot_represent(weight, message):
    with pytest.raises((TypeError, ValueError), match=message):
        to_nf4(weight)


def test_to_nf4_refuses_fp8():
    with pytest.raises(TypeError, match="float8"):
        to_nf4(torch.randn(8, 64).to(torch.float8_e4m3fn))
