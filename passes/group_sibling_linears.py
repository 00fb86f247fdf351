"""GroupSiblingLinears: ``nf4compile.linear`` calls on one input become one ``nf4compile.linear_group``.

A decoder layer reads its normalized hidden state three times (the q, k and v projections) and its MLP
input twice (gate and up). At decode each of those is a short, memory-bound GEMV (one row of activations)
or small GEMM (a batch of rows); one launch over all the sibling weights keeps the GPU busier and saves
launches (bench/NOTES.md). Each linear's output is then a slice of the group's (a view: no copy).

Only where it pays and changes nothing but the order of fp32 sums: the input has at most MAX_GROUP_ROWS
rows for every value of its symbolic sizes (decode graphs; prefill keeps one GEMM per weight), the linears
compute x @ W.T with the same block size, K, scale format and bias presence, and a group holds at most
three (the kernels' limit; more siblings make several groups). Runs after FuseDequantMatmul, inside
Inductor only: an exported program serves any batch.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from nf4compile.passes.fuse_dequant_matmul import bound_args

aten = torch.ops.aten

MAX_GROUP = 3
MAX_GROUP_ROWS = 16  # a decode batch: where the fused kernels read each weight once for all the rows
_NF4_ARGS = ("packed", "absmax", "nested_absmax", "offset")
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


class GroupSiblingLinears:
    """Graph pass: returns the number of ``nf4compile.linear`` calls it grouped."""

    def __call__(self, graph: Graph) -> int:
        order = {node: i for i, node in enumerate(graph.nodes)}
        linears = graph.find_nodes(op="call_function", target=torch.ops.nf4compile.linear.default)
        args = {node: bound_args(node) for node in linears}
        siblings = defaultdict(list)
        for node, node_args in args.items():
            key = _sibling_key(node, node_args)
            if key is not None:
                siblings[key].append(node)
        grouped = 0
        for nodes in siblings.values():
            nodes.sort(key=order.__getitem__)
            for start in range(0, len(nodes), MAX_GROUP):
                chunk = nodes[start:start + MAX_GROUP]
                chunk_args = [args[node] for node in chunk]
                if len(chunk) > 1 and _inputs_precede(chunk_args, order[chunk[0]], order):
                    _group(graph, chunk, chunk_args)
                    grouped += len(chunk)
        return grouped


def _sibling_key(node: Node, args: dict):
    """What linears must share to be grouped, or None if this one cannot be."""
    x, out = args["x"].meta.get("val"), node.meta.get("val")
    if args["x_at_w"] or x is None or out is None:
        return None
    if not statically_known_true(math.prod(x.shape[:-1]) <= MAX_GROUP_ROWS):
        return None
    if not all(isinstance(args[name], int) for name in ("block_size", "out_features", "in_features")):
        return None
    source = args["x"]
    while source.op == "call_function" and source.target in _VIEWS:  # q, k and v may each view the input anew
        source = source.args[0]
    return (source, tuple(x.shape), x.dtype, args["block_size"], args["in_features"],
            args["nested_absmax"] is None, args["bias"] is None)


def _inputs_precede(chunk_args: list[dict], first: int, order: dict) -> bool:
    """Whether every weight and bias of the chunk exists before its first linear (where the group goes)."""
    return not any(
        isinstance(args[name], Node) and order[args[name]] > first
        for args in chunk_args for name in (*_NF4_ARGS, "bias")
    )


def _group(graph: Graph, chunk: list[Node], args: list[dict]) -> None:
    rows = [a["out_features"] for a in args]
    with graph.inserting_before(chunk[0]):
        group = graph.create_node(
            "call_function",
            torch.ops.nf4compile.linear_group.default,
            (args[0]["x"], *([a[name] for a in args] for name in _NF4_ARGS), args[0]["block_size"], rows,
             args[0]["in_features"], [a["bias"] for a in args]),
            name="nf4_linear_group",
        )
        group.meta["val"] = torch.cat([node.meta["val"] for node in chunk], dim=-1)
        pieces, start = [], 0
        for n in rows:
            pieces.append(graph.call_function(aten.slice.Tensor, (group, -1, start, start + n)))
            pieces[-1].meta["val"] = group.meta["val"][..., start:start + n]
            start += n
    for node, piece in zip(chunk, pieces):  # erased only now: the nodes above were inserted before chunk[0]
        node.replace_all_uses_with(piece)
        x = node.args[0]
        graph.erase_node(node)
        if x.op == "call_function" and x.target in _VIEWS and not x.users:  # a sibling's own view of the input
            graph.erase_node(x)
