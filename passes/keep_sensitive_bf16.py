"""KeepSensitiveBF16: sensitive layers (the logits, norms, embeddings) never compute from NF4.

``quantize()`` and ``load()`` already keep them dense; this pass is the guard for graphs that still read a
sensitive weight as NF4 (a model quantized by hand, or with ``keep_sensitive=False``):
- in an exported program, whose weights are real, the dequantize of a sensitive weight is replaced by its
  dense value, computed once and stored as a parameter under the module's own name (``lm_head.weight``);
- inside torch.compile, where weights are fake, the dequantize is marked so that no pass fuses it, and a
  warning names the layer.
Sensitivity is by module name, with the patterns of ``nf4compile.policy`` (``name_matches``).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx import Graph, Node

from nf4compile.passes.fuse_dequant_matmul import KEEP_DENSE, bound_args, dequantize_nodes
from nf4compile.passes.names import layer_of_node, layer_of_weight, module_name
from nf4compile.passes.program import copy_graph, with_graph
from nf4compile.policy import name_matches


class KeepSensitiveBF16:
    """``sensitive``: {module name or pattern: why it is sensitive}."""

    def __init__(self, sensitive: Mapping[str, str]):
        self.sensitive = dict(sensitive)
        self._warned: set[str] = set()

    def reason(self, layer: str) -> str | None:
        for pattern, why in self.sensitive.items():
            if name_matches(layer, [pattern]):
                return why
        return None

    def __call__(self, graph: Graph) -> int:
        """On a torch.compile graph: mark sensitive dequantizes and warn. Returns how many."""
        kept = 0
        for dq in dequantize_nodes(graph):
            layer = _layer_reading(dq)
            why = self.reason(layer) if layer else None
            if not why:
                continue
            dq.meta[KEEP_DENSE] = layer
            kept += 1
            if layer not in self._warned:
                self._warned.add(layer)
                warnings.warn(
                    f"nf4compile: {layer} is sensitive ({why}) but its weight is NF4 in this compiled graph; "
                    "it is left unfused (dequantize + matmul). Dequantize that weight before compiling; "
                    "nf4compile.quantize/load keep sensitive layers dense unless keep_sensitive=False.",
                    stacklevel=2,
                )
        return kept

    def on_program(self, ep: ExportedProgram) -> ExportedProgram:
        """On an exported program: sensitive dequantizes become dense parameters. Returns a new program."""
        graph = copy_graph(ep.graph)
        specs = list(ep.graph_signature.input_specs)
        spec_of = {spec.arg.name: spec for spec in specs if isinstance(spec.arg, TensorArgument)}
        state_dict, constants = dict(ep.state_dict), dict(ep.constants)
        changed = False
        for dq in dequantize_nodes(graph):
            args = bound_args(dq)
            inner = [args[k] for k in ("packed", "absmax", "nested_absmax", "offset") if args[k] is not None]
            if not all(isinstance(a, Node) and a.op == "placeholder" and a.name in spec_of for a in inner):
                continue  # computed in the graph, not stored weights
            targets = [spec_of[a.name].target for a in inner]
            weight = module_name(targets[0])  # lm_head.parametrizations.weight.original0 -> lm_head.weight
            if not self.reason(layer_of_weight(weight)) or weight in state_dict or weight in constants:
                continue
            values = [state_dict[t] if t in state_dict else constants[t] for t in targets]
            values += [None] * (4 - len(values))
            dense = torch.ops.nf4compile.dequantize(*values, args["block_size"], args["shape"], args["dtype"])
            first = next(n for n in graph.nodes if n in inner)  # the new placeholder takes its place
            with graph.inserting_before(first):
                placeholder = graph.placeholder("p_" + weight.replace(".", "_"))
            placeholder.meta = {"val": dq.meta["val"]}
            dq.replace_all_uses_with(placeholder)
            graph.erase_node(dq)
            specs.insert(
                specs.index(spec_of[first.name]),
                InputSpec(InputKind.PARAMETER, TensorArgument(placeholder.name), weight, None),
            )
            state_dict[weight] = nn.Parameter(dense, requires_grad=False)
            for node, target in zip(inner, targets):
                if not node.users:
                    specs.remove(spec_of[node.name])
                    graph.erase_node(node)
                    if not any(s.target == target for s in specs):
                        state_dict.pop(target, None)
                        constants.pop(target, None)
            changed = True
        return with_graph(ep, graph, specs, state_dict, constants) if changed else ep


def _layer_reading(dq: Node) -> str | None:
    """The layer a dequantize belongs to: where it was traced, else where its result is consumed."""
    return layer_of_node(dq) or next((layer_of_node(u) for u in dq.users if layer_of_node(u)), None)
