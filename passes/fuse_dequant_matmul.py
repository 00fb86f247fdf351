"""FuseDequantMatmul: ``nf4compile.dequantize -> (views)* -> matmul`` becomes one ``nf4compile.linear``.

Traced graphs of NF4 models carry the dense weight explicitly (the NF4Tensor dispatch contract); this pass
puts the 4-bit weight back into the matmul, so the dense weight is never materialized. The fused op picks
its kernel (GEMV, GEMM or dequantize + cuBLAS) by the number of rows at run time, so the pass always
rewrites and never looks at M.

Only rewrites whose result is provably the same are made: every op between the dequantize and the matmul
must keep each weight matrix intact (transposes of the last two dims, views and broadcasts that add or
reshape leading dims), and the matmul's output shape must be what ``nf4compile.linear`` returns. Anything
else (a weight on the left of a matmul, a slice of the weight, a cast) is left as is, and a dequantize
with users that are not fused stays for them.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

KEEP_DENSE = "nf4compile_keep_dense"  # node.meta key set by KeepSensitiveBF16: never fuse this dequantize

_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}
_SAME_MATRIX = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.unsqueeze.default, aten.clone.default, aten.alias.default,
}
_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default, aten.matmul.default}


def dequantize_nodes(graph: Graph) -> list[Node]:
    return list(graph.find_nodes(op="call_function", target=torch.ops.nf4compile.dequantize.default))


def bound_args(node: Node) -> dict:
    """An op node's arguments by schema name (defaults filled in), however they were passed."""
    schema = node.target._schema.arguments
    bound = {a.name: a.default_value for a in schema if a.has_default_value()}
    bound.update(zip((a.name for a in schema), node.args))
    bound.update(node.kwargs)
    return bound


class FuseDequantMatmul:
    """Graph pass: returns the number of matmuls it rewrote into ``nf4compile.linear``."""

    def __call__(self, graph: Graph) -> int:
        fused = 0
        for dq in dequantize_nodes(graph):
            if dq.meta.get(KEEP_DENSE):
                continue
            walked: list[Node] = []
            fused += self._fuse_users(graph, dq, dq, transposed=False, walked=walked)
            for node in reversed(walked):  # the chain, then the dequantize, once nothing reads them
                if not node.users:
                    graph.erase_node(node)
            if not dq.users:
                graph.erase_node(dq)
        return fused

    def _fuse_users(self, graph: Graph, dq: Node, node: Node, transposed: bool, walked: list[Node]) -> int:
        """Follow ``node`` (the weight, transposed or not, maybe with broadcast leading dims) to matmuls."""
        fused = 0
        for user in list(node.users):
            if user.target in _MATMULS:
                fused += self._fuse_matmul(graph, dq, user, node, transposed)
                continue
            step = _matrix_after(user, node, transposed)
            if step is not None:
                walked.append(user)
                fused += self._fuse_users(graph, dq, user, step, walked)
        return fused

    def _fuse_matmul(self, graph: Graph, dq: Node, mm: Node, weight: Node, transposed: bool) -> int:
        args = bound_args(mm)
        if mm.target is aten.linear.default:  # linear(x, w, b) = x @ w.T: the weight is one more .T away
            x, w, bias, transposed = args["input"], args["weight"], args["bias"], not transposed
        elif mm.target is aten.addmm.default:
            if args["alpha"] != 1 or args["beta"] != 1:
                return 0
            bias, x, w = args["self"], args["mat1"], args["mat2"]
        else:
            x, w, bias = args["self"], args.get("mat2", args.get("other")), None
        if w is not weight or x is weight:  # weight on the left (W @ y): not an x @ W.T
            return 0
        d = bound_args(dq)
        out_features, in_features = d["shape"]
        out_dim = in_features if not transposed else out_features  # x @ W.T -> N; x @ W -> K
        x_val, out_val = x.meta.get("val"), mm.meta.get("val")
        if x_val is None or out_val is None or x_val.dtype != d["dtype"]:
            return 0
        if not _same_shape(out_val.shape, (*x_val.shape[:-1], out_dim)):
            return 0  # a broadcast of x by the weight's leading dims: not a linear of x
        bias_val = bias.meta.get("val") if bias is not None else None
        if bias is not None and bias_val is None:
            return 0
        fold_bias = bias is not None and _same_shape(bias_val.shape, (out_dim,))
        with graph.inserting_before(mm):
            fused = graph.create_node(
                "call_function",
                torch.ops.nf4compile.linear.default,
                (x, d["packed"], d["absmax"], d["nested_absmax"], d["offset"], d["block_size"],
                 out_features, in_features, bias if fold_bias else None, not transposed),
                name="nf4_linear",
            )
            fused.meta = copy.copy(mm.meta)
            out = fused
            if bias is not None and not fold_bias:  # e.g. addmm with a [M, N] bias: add it after
                out = graph.call_function(aten.add.Tensor, (fused, bias))
                out.meta = copy.copy(mm.meta)
        mm.replace_all_uses_with(out)
        graph.erase_node(mm)
        return 1


def _matrix_after(op: Node, weight: Node, transposed: bool) -> Optional[bool]:
    """Whether ``op``'s output is W.T (True) or W (False) in its last two dims, or None if not a weight."""
    if op.op != "call_function" or not op.args or op.args[0] is not weight:
        return None
    before, after = weight.meta.get("val"), op.meta.get("val")
    if before is None or after is None or after.dim() < 2:
        return None
    n = before.dim()
    if op.target in _TRANSPOSES:
        if op.target is aten.t.default:
            dims = [1, 0]
        elif op.target is aten.transpose.int:
            dims = list(range(n))
            a, b = op.args[1] % n, op.args[2] % n
            dims[a], dims[b] = dims[b], dims[a]
        else:
            dims = [d % n for d in op.args[1]]
        if dims[:-2] != list(range(n - 2)):
            return None  # moves a matrix dim into the leading (broadcast) dims
        return transposed if dims[-2:] == [n - 2, n - 1] else not transposed
    if op.target in _SAME_MATRIX and _same_shape(after.shape[-2:], before.shape[-2:]):
        return transposed  # only leading (broadcast) dims change: every matrix is still the weight
    return None


def _same_shape(a, b) -> bool:
    """Shape equality that holds for every value of the symbolic sizes, without adding guards."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))
