"""torch.compile of quantized models: the Inductor hook, the nf4compile backend, the fuse switch.

Every compile costs seconds on CI's 2 cores: each test compiles once and checks everything on that.
"""

import importlib.metadata

import expecttest
import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.utils.checkpoint import CheckpointPolicy

import nf4compile
from nf4compile.passes import NF4JointPassManager, NF4PassManager, PassOptions, RecomputeDequantize, register_inductor_passes
from graph_utils import show, tiny_llama

LINEAR = "torch.ops.nf4compile.linear.default"
LINEAR_GROUP = "torch.ops.nf4compile.linear_group.default"
DEQUANTIZE = "torch.ops.nf4compile.dequantize.default"
bf16 = torch.bfloat16


@pytest.fixture(autouse=True)
def clean_inductor_hooks():
    """Each test starts with empty Inductor hooks and fresh dynamo and Inductor caches (a graph cached on
    disk by an earlier run would skip the passes under test), and leaves them as it found them."""
    with fresh_cache(), inductor_config.patch(
        post_grad_custom_pre_pass=None, post_grad_custom_post_pass=None, joint_custom_pre_pass=None
    ):
        torch._dynamo.reset()
        yield
    torch._dynamo.reset()


class Recorder(CustomGraphPass):
    """A user's own pass: prints the graph it is given."""

    def __init__(self, uuid="recorder-v1"):
        self._uuid, self.graphs = uuid, []

    def __call__(self, graph):
        self.graphs.append(show(graph))

    def uuid(self):
        return self._uuid


class ThreeLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 48)
        self.down = nn.Linear(48, 32, bias=False)
        self.lm_head = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.proj(x))))


def two_linears(config=None):
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False)).to(bf16)
    return nf4compile.quantize(model, config)


class TestInductorHook(expecttest.TestCase):
    def test_quantize_registers_chains_and_fuses(self):
        model = ThreeLinears().to(bf16)
        # A sensitive layer that arrives in NF4 (quantize() itself would keep it dense).
        model.lm_head.weight = nn.Parameter(nf4compile.to_nf4(model.lm_head.weight.detach()), requires_grad=False)
        theirs, after = Recorder(), Recorder()
        inductor_config.post_grad_custom_pre_pass = theirs  # set by the user before quantize()
        inductor_config.post_grad_custom_post_pass = after
        nf4compile.quantize(model)
        ours = inductor_config.post_grad_custom_pre_pass
        assert isinstance(ours, NF4PassManager) and ours.user_pass is theirs

        counters.clear()
        x = torch.randn(2, 5, 64, dtype=bf16)
        with torch.no_grad(), pytest.warns(UserWarning, match=r"lm_head is sensitive"):
            out, (code,) = run_and_get_code(torch.compile(model, fullgraph=True), x)
        assert code.count(LINEAR + "(") == 2, "proj and down are fused"
        assert code.count(DEQUANTIZE + "(") == 1, "lm_head is not: it is sensitive"
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0, "a CustomGraphPass with a uuid keeps the FX graph cache on"
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=0.02, atol=0.02)
        # The user's pass ran first, on the graph as Inductor produced it.
        self.assertExpectedInline(theirs.graphs[0], """\
inputs: arg0_1, arg1_1, arg2_1, arg3_1, arg4_1, arg5_1, arg6_1, arg7_1, arg8_1, arg9_1, arg10_1, arg11_1, arg12_1, arg13_1
view = aten.view(arg5_1, [10, 64])
dequantize = nf4compile.dequantize(arg0_1, arg1_1, arg2_1, arg3_1, 64, [48, 64], bf16)
permute = aten.permute(dequantize, [1, 0])
addmm = aten.addmm(arg4_1, view, permute)
view_1 = aten.view(addmm, [2, 5, 48])
relu = aten.relu(view_1)
view_2 = aten.view(relu, [10, 48])
dequantize_1 = nf4compile.dequantize(arg6_1, arg7_1, arg8_1, arg9_1, 64, [32, 48], bf16)
permute_1 = aten.permute(dequantize_1, [1, 0])
mm = aten.mm(view_2, permute_1)
dequantize_2 = nf4compile.dequantize(arg10_1, arg11_1, arg12_1, arg13_1, 64, [16, 32], bf16)
permute_2 = aten.permute(dequantize_2, [1, 0])
mm_1 = aten.mm(mm, permute_2)
view_3 = aten.view(mm_1, [2, 5, 16])
return [view_3]""")
        self.assertExpectedInline(after.graphs[0], """\
inputs: arg0_1, arg1_1, arg2_1, arg3_1, arg4_1, arg5_1, arg6_1, arg7_1, arg8_1, arg9_1, arg10_1, arg11_1, arg12_1, arg13_1
view = aten.view(arg5_1, [10, 64])
nf4_linear = nf4compile.linear(view, arg0_1, arg1_1, arg2_1, arg3_1, 64, 48, 64, arg4_1, False)
view_1 = aten.view(nf4_linear, [2, 5, 48])
relu = aten.relu(view_1)
view_2 = aten.view(relu, [10, 48])
nf4_linear_1 = nf4compile.linear(view_2, arg6_1, arg7_1, arg8_1, arg9_1, 64, 32, 48, None, False)
dequantize = nf4compile.dequantize(arg10_1, arg11_1, arg12_1, arg13_1, 64, [16, 32], bf16)
permute = aten.permute(dequantize, [1, 0])
mm = aten.mm(nf4_linear_1, permute)
view_3 = aten.view(mm, [2, 5, 16])
return [view_3]""")

    def test_registration_is_idempotent_and_follows_the_last_call(self):
        theirs = Recorder()
        inductor_config.post_grad_custom_pre_pass = theirs
        first = register_inductor_passes()
        assert register_inductor_passes() is first and first.user_pass is theirs
        two_linears(nf4compile.NF4Config(fuse=False))
        unfused = inductor_config.post_grad_custom_pre_pass
        assert unfused.options.fuse is False and unfused.user_pass is theirs, "rewrapped, never nested"
        assert unfused.uuid() != first.uuid()
        two_linears(nf4compile.NF4Config(keep_sensitive=False))
        assert inductor_config.post_grad_custom_pre_pass.options == PassOptions(fuse=True, sensitive={})
        later = Recorder("later")
        inductor_config.post_grad_custom_pre_pass = later  # a user's pass set after quantize() replaces ours
        assert register_inductor_passes().user_pass is later

    def test_uuid_folds_the_users_pass(self):
        plain = NF4PassManager().uuid()
        assert isinstance(plain, bytes) and plain == NF4PassManager().uuid(), "stable: the FX graph cache hits"
        assert NF4PassManager(user_pass=Recorder("a")).uuid() != NF4PassManager(user_pass=Recorder("b")).uuid()
        assert NF4PassManager(user_pass=Recorder(None)).uuid() is None, "their pass bypasses the cache: so do we"
        assert NF4PassManager(user_pass=lambda graph: None).uuid() is None
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NF4COMPILE_FUSE", "0")
            assert NF4PassManager().uuid() != plain

    def test_joint_hook_chains_the_users_pass_and_marks_dequantize_for_recomputation(self):
        theirs = Recorder("joint")
        inductor_config.joint_custom_pre_pass = theirs
        two_linears()
        ours = inductor_config.joint_custom_pre_pass
        assert isinstance(ours, NF4JointPassManager) and ours.user_pass is theirs
        assert register_inductor_passes() and inductor_config.joint_custom_pre_pass is ours, "idempotent"
        assert isinstance(ours.uuid(), bytes) and ours.uuid() != NF4JointPassManager(Recorder("other")).uuid()
        assert NF4JointPassManager(Recorder(None)).uuid() is None

        graph = torch.fx.Graph()
        packed, absmax = graph.placeholder("packed"), graph.placeholder("absmax")
        dequantize = [graph.call_function(torch.ops.nf4compile.dequantize.default, (packed, absmax, None, None, 64, [8, 8], bf16))
                      for _ in range(2)]
        dequantize[1].meta["recompute"] = CheckpointPolicy.MUST_SAVE  # e.g. a user's selective checkpointing
        graph.output(dequantize)
        ours(graph)
        assert len(theirs.graphs) == 1, "their pass ran too"
        assert [n.meta["recompute"] for n in dequantize] == [CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.MUST_SAVE]
        assert RecomputeDequantize()(graph) == 0

    def test_users_list_of_passes_is_chained(self):
        a, b = Recorder("a"), Recorder("b")
        inductor_config.post_grad_custom_pre_pass = [a, b]
        manager = register_inductor_passes()
        graph = torch.fx.symbolic_trace(nn.ReLU()).graph
        manager(graph)
        assert len(a.graphs) == len(b.graphs) == 1


def test_load_registers_the_passes(tmp_path):
    nf4compile.save(two_linears(), tmp_path / "model.safetensors")
    inductor_config.post_grad_custom_pre_pass = None
    skeleton = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False)).to(bf16)
    nf4compile.load(skeleton, tmp_path / "model.safetensors")
    assert isinstance(inductor_config.post_grad_custom_pre_pass, NF4PassManager)


def test_backend_applies_the_passes_without_the_global_hook():
    model = two_linears()
    inductor_config.post_grad_custom_pre_pass = None  # e.g. a user who reset it after quantize()
    inductor_config.joint_custom_pre_pass = None
    x = torch.randn(3, 64, dtype=bf16)
    with torch.no_grad():
        out, (code,) = run_and_get_code(torch.compile(model, backend="nf4compile"), x)
        torch.testing.assert_close(out, model(x), rtol=0.02, atol=0.02)
    assert code.count(LINEAR + "(") == 2 and DEQUANTIZE not in code
    assert inductor_config.post_grad_custom_pre_pass is None, "the backend changes no global config"
    assert inductor_config.joint_custom_pre_pass is None


def test_backend_entry_point():
    try:
        entry_points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        entry_points = ()
    found = [ep for ep in entry_points if ep.name == "nf4compile"]
    if not found:
        pytest.skip("nf4compile is not installed (pip install -e .): no entry points")
    assert found[0].load() is nf4compile.passes.nf4compile_backend


def test_fuse_off_leaves_dequantize_and_matmul():
    model = two_linears(nf4compile.NF4Config(fuse=False))
    x = torch.randn(3, 64, dtype=bf16)
    with torch.no_grad():
        out, (code,) = run_and_get_code(torch.compile(model), x)
        torch.testing.assert_close(out, model(x), rtol=0.02, atol=0.02)
    assert LINEAR not in code and code.count(DEQUANTIZE + "(") == 2


def test_freezing_does_not_fold_the_weights_back_to_dense():
    model = two_linears()
    x = torch.randn(3, 64, dtype=bf16)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        out, (code,) = run_and_get_code(torch.compile(model), x)
        torch.testing.assert_close(out, model(x), rtol=0.02, atol=0.02)
    assert code.count(LINEAR + "(") == 2 and DEQUANTIZE not in code


@pytest.mark.parametrize("shape,linears,groups", [((2, 9), 7, 0), ((1, 1), 2, 2)], ids=["prefill", "decode"])
def test_llama_compiles_to_fused_ops_only(shape, linears, groups):
    # Prefill (18 rows, more than GroupSiblingLinears groups): q, k, v, o, gate, up and down fused one by one;
    # lm_head stays bf16. Decode: q, k, v in one nf4compile.linear_group, gate and up in another, o and down alone.
    model = tiny_llama()
    ids = torch.randint(0, 128, shape)
    with torch.no_grad():
        out, (code,) = run_and_get_code(torch.compile(model, fullgraph=True), ids)
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=0.05, atol=0.05)
    assert code.count(LINEAR + "(") == linears and code.count(LINEAR_GROUP + "(") == groups
    assert DEQUANTIZE not in code


@pytest.mark.cuda
def test_llama_decodes_with_cuda_graphs():
    model = tiny_llama().cuda()
    ids = torch.randint(0, 128, (1, 1), device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    with torch.no_grad():
        out, (code,) = run_and_get_code(compiled, ids)
        for _ in range(3):  # recorded, then replayed
            out = compiled(ids)
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=0.05, atol=0.05)
    assert code.count(LINEAR_GROUP + "(") == 2 and code.count(LINEAR + "(") == 2 and DEQUANTIZE not in code
    assert counters["inductor"]["cudagraph_skips"] == 0
