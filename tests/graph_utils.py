"""Printing FX graphs for expect tests, and the tiny Llama shared by the pass, export and compile tests.

``show`` prints one line per node, ``name = op(args)``, normalized so that the text depends on the graph's
structure and not on the torch version: node names are renumbered per base name in graph order
(``view_3`` may be ``view_7`` elsewhere), ``reshape``/``_unsafe_view`` print as ``view``, ``aten.t`` as
``permute [1, 0]``, an NF4 weight's inner tensors ``p_fc_parametrizations_weight_original0`` as
``p_fc_weight0``, dtypes as ``bf16``.
"""

from __future__ import annotations

import collections
import functools
import re

import torch
from torch import fx

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default, aten.matmul.default}
_VIEWS = {aten.reshape.default, aten._unsafe_view.default}
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def show(graph: fx.Graph, nf4_only: bool = False) -> str:
    """The graph as text; ``nf4_only``: only NF4 ops, matmuls, and the ops between a dequantize and its users."""
    names: dict[fx.Node, str] = {}
    seen = collections.Counter()
    for node in graph.nodes:
        base = re.sub(r"_\d+$", "", node.name) if node.op != "placeholder" else node.name
        base = re.sub(r"parametrizations_(\w+?)_original(\d+)$", r"\1\2", base).replace("reshape", "view")
        names[node] = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1
    shown = _nf4_related(graph) if nf4_only else set(graph.nodes)

    def fmt(a) -> str:
        if isinstance(a, fx.Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(map(fmt, a)) + "]"
        if isinstance(a, torch.dtype):
            return _DTYPES.get(a, str(a))
        return str(a)

    lines = []
    inputs = [names[n] for n in graph.nodes if n.op == "placeholder" and n in shown]
    if inputs and not nf4_only:
        lines.append("inputs: " + ", ".join(inputs))
    for node in graph.nodes:
        if node not in shown or node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append("return " + fmt(node.args[0]))
            continue
        target, args = node.target, list(node.args)
        if target in _VIEWS:
            target = aten.view.default
        if target is aten.t.default:
            target, args = aten.permute.default, [args[0], [1, 0]]
        op = str(target).removesuffix(".default").removeprefix("torch.ops.")
        args = [fmt(a) for a in args] + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()]
        lines.append(f"{names[node]} = {op}({', '.join(args)})")
    return "\n".join(lines)


def _nf4_related(graph: fx.Graph) -> set:
    shown = set()
    for node in graph.nodes:
        if str(node.target).startswith("nf4compile.") or node.target in MATMULS:
            shown.add(node)
    frontier = [n for n in shown if n.target == torch.ops.nf4compile.dequantize.default]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in shown and user.op == "call_function":
                shown.add(user)
                if user.target not in MATMULS:
                    frontier.append(user)
    return shown


def count(graph_or_code, op) -> int:
    """How many calls of ``op`` (e.g. ``torch.ops.nf4compile.linear.default``) a graph or generated code has."""
    if isinstance(graph_or_code, str):
        return graph_or_code.count(f"{op}(")
    return len(graph_or_code.find_nodes(op="call_function", target=op))


def tiny_llama(layers: int = 1):
    """A LlamaForCausalLM with random weights, small enough for CI, quantized (lm_head stays bf16)."""
    import nf4compile
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, use_cache=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return nf4compile.quantize(model)


@functools.cache
def llama_program():
    """(quantized tiny Llama, its ``torch.export`` with dynamic batch and sequence, decomposed, unfused).

    Exporting costs seconds on CI: done once per session, shared by the pass and export tests.
    """
    import pytest
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < (2, 13):
        # Seen on torch 2.11 + transformers 5.17 (H100, 2026-11-23): the export fails in tracing on a
        # guard min(16*seq, 32*seq) == 16*seq that 2.11 cannot prove; torch 2.13 exports it.
        pytest.skip("exporting a Llama with a dynamic sequence length needs torch >= 2.13")
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    dims = ({0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=64)},)
    ep = torch.export.export(model, (ids,), dynamic_shapes=dims)
    return model, ep.run_decompositions()
