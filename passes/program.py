"""Rebuilding an ExportedProgram around an edited graph: the passes never edit the caller's program."""

from __future__ import annotations

import copy
from typing import Optional

from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputSpec
from torch.fx import Graph


def with_graph(
    ep: ExportedProgram,
    graph: Graph,
    input_specs: Optional[list[InputSpec]] = None,
    state_dict: Optional[dict] = None,
    constants: Optional[dict] = None,
) -> ExportedProgram:
    """A new program running ``graph``, with ``ep``'s signature, weights and metadata unless given."""
    signature = ExportGraphSignature(
        list(ep.graph_signature.input_specs if input_specs is None else input_specs),
        list(ep.graph_signature.output_specs),
    )
    return ExportedProgram(
        root=ep.graph_module,
        graph=graph,
        graph_signature=signature,
        state_dict=dict(ep.state_dict if state_dict is None else state_dict),
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs,
        constants=dict(ep.constants if constants is None else constants),
        verifiers=ep.verifiers,
    )


def copy_graph(graph: Graph) -> Graph:
    """A copy of an exported graph: nodes, names and meta dicts (fake values are shared)."""
    new = Graph()
    copies: dict = {}
    output, old_output = new.graph_copy(graph, copies, return_output_node=True)
    new.output(output).meta = copy.copy(old_output.meta)
    for old, node in copies.items():
        # Export names placeholders freely (``input``); a plain copy would avoid the builtin (``input_1``)
        # and break the graph signature, which refers to them by name.
        if node.name != old.name:
            node.name = old.name
            if node.op == "placeholder":
                node.target = old.target
    return new


def copy_program(ep: ExportedProgram) -> ExportedProgram:
    """Same weights, a copy of the graph."""
    return with_graph(ep, copy_graph(ep.graph))
