"""The pass manager: runs the nf4compile passes in order, inside Inductor and on exported programs.

Inductor hook: ``torch._inductor.config.post_grad_custom_pre_pass``. Post-grad, because the NF4Tensor
only turns into ``nf4compile.dequantize`` + aten matmul when AOTAutograd unwraps the subclass (a pre-grad
pass sees ``aten.linear`` on an opaque weight); the *pre* hook, because Inductor's own post-grad passes run
between the pre and the post hook and may rewrite the matmul out of reach (on GPU, ``addmm`` feeding
pointwise ops is split into ``mm`` + add, small matmuls may be padded or decomposed). The hook holds one
object: registering wraps whatever the user had set (run first, unchanged, so it sees the graph it always
saw) and folds its ``uuid()`` into ours. A user who sets the hook *after* ``quantize()``/``load()``
replaces us: compiled graphs are then unfused (still correct) until ``register_inductor_passes()`` (or the
next ``quantize()``/``load()``) wraps their pass in turn.

Training graphs need one more hook, ``joint_custom_pre_pass`` (the joint forward + backward graph, before
AOTAutograd splits it): ``NF4JointPassManager`` runs RecomputeDequantize there, chained the same way.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.export import ExportedProgram
from torch.fx import Graph

from nf4compile.passes.fuse_dequant_matmul import FuseDequantMatmul
from nf4compile.passes.group_sibling_linears import GroupSiblingLinears
from nf4compile.passes.keep_sensitive_bf16 import KeepSensitiveBF16
from nf4compile.passes.program import copy_program
from nf4compile.passes.recompute_dequantize import RecomputeDequantize
from nf4compile.policy import SENSITIVE_NAMES, sensitive_layers

# What the passes do is their source and the naming policy: the uuid hashes both.
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = (*sorted(glob.glob(os.path.join(_HERE, "*.py"))), os.path.join(os.path.dirname(_HERE), "policy.py"))
DEFAULT_SENSITIVE = {name: "produces the logits" for name in SENSITIVE_NAMES}


def fuse_enabled(fuse: bool = True) -> bool:
    """``NF4Config(fuse=False)`` or ``NF4COMPILE_FUSE=0`` turn the fusion off (to benchmark both)."""
    return fuse and os.environ.get("NF4COMPILE_FUSE", "1") != "0"


def group_enabled() -> bool:
    """``NF4COMPILE_GROUP=0`` leaves sibling linears ungrouped (to benchmark both)."""
    return os.environ.get("NF4COMPILE_GROUP", "1") != "0"


@dataclass(frozen=True)
class PassOptions:
    """fuse: rewrite dequantize + matmul into nf4compile.linear. sensitive: {module name or pattern: why}."""

    fuse: bool = True
    sensitive: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SENSITIVE))

    def key(self) -> str:
        return repr((fuse_enabled(self.fuse), group_enabled(), sorted(self.sensitive.items())))


class NF4PassManager(CustomGraphPass):
    """KeepSensitiveBF16, FuseDequantMatmul then GroupSiblingLinears, after ``user_pass`` (the one that was
    in the hook)."""

    def __init__(self, options: PassOptions = PassOptions(), user_pass: Any = None):
        self.options = options
        self.user_pass = user_pass
        self.keep_sensitive = KeepSensitiveBF16(options.sensitive)

    def __call__(self, graph: Graph) -> None:
        for user_pass in _as_list(self.user_pass):
            user_pass(graph)
        self.keep_sensitive(graph)
        if fuse_enabled(self.options.fuse):
            FuseDequantMatmul()(graph)
            if group_enabled():
                GroupSiblingLinears()(graph)
        graph.lint()

    def uuid(self) -> Optional[bytes]:
        return _chain_uuid(self.user_pass, self.options.key())


class NF4JointPassManager(CustomGraphPass):
    """RecomputeDequantize on the joint training graph, after ``user_pass`` (the one that was in the hook)."""

    def __init__(self, user_pass: Any = None):
        self.user_pass = user_pass

    def __call__(self, graph: Graph) -> None:
        for user_pass in _as_list(self.user_pass):
            user_pass(graph)
        RecomputeDequantize()(graph)

    def uuid(self) -> Optional[bytes]:
        return _chain_uuid(self.user_pass, "joint")


def _as_list(user_pass: Any) -> list:
    if user_pass is None:
        return []
    return list(user_pass) if isinstance(user_pass, (list, tuple)) else [user_pass]


def _chain_uuid(user_pass: Any, key: str) -> Optional[bytes]:
    """sha256(our sources, ``key``, the chained passes' uuids); None if one of theirs has none."""
    theirs = []
    for one in _as_list(user_pass):
        uuid = one.uuid() if isinstance(one, CustomGraphPass) else None
        if uuid is None:
            return None  # their pass cannot be cached: neither can the chain (as without us)
        theirs.append(repr(uuid))
    digest = hashlib.sha256(get_hash_for_files(_SOURCES))
    digest.update(repr((key, theirs)).encode())
    return digest.digest()


def manager_for(current: Any, fuse: Optional[bool] = None, sensitive: Optional[Mapping[str, str]] = None) -> NF4PassManager:
    """A manager with these options (None: as ``current``'s, if it is ours) that chains ``current``."""
    if isinstance(current, NF4PassManager):
        options, user_pass = current.options, current.user_pass
    else:
        options, user_pass = PassOptions(), current
    if fuse is not None:
        options = dataclasses.replace(options, fuse=fuse)
    if sensitive is not None:
        options = dataclasses.replace(options, sensitive=dict(sensitive))
    if isinstance(current, NF4PassManager) and options == current.options:
        return current
    return NF4PassManager(options, user_pass)


def joint_manager_for(current: Any) -> NF4JointPassManager:
    """Ours if ``current`` is ours, else a joint-graph manager that chains ``current``."""
    return current if isinstance(current, NF4JointPassManager) else NF4JointPassManager(current)


def register_inductor_passes(fuse: Optional[bool] = None, sensitive: Optional[Mapping[str, str]] = None) -> NF4PassManager:
    """Install (or update) the passes in Inductor's post-grad and joint-graph hooks; idempotent.

    Called by ``quantize()`` and ``load()``; the options follow the last call (None keeps the current
    value). Also makes ``torch.compile(model, backend="nf4compile")`` available without the entry point.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor import constant_folding

    from nf4compile.passes.backend import register_backend

    manager = manager_for(inductor_config.post_grad_custom_pre_pass, fuse, sensitive)
    inductor_config.post_grad_custom_pre_pass = manager
    # Training: the backward recomputes each dequantize instead of keeping the dense weight alive.
    inductor_config.joint_custom_pre_pass = joint_manager_for(inductor_config.joint_custom_pre_pass)
    # Freezing would otherwise fold dequantize(weight) into a dense constant: 4x the memory, no fusion.
    if torch.ops.nf4compile.dequantize.default not in constant_folding._dont_constant_fold:
        constant_folding.add_dont_constant_fold(torch.ops.nf4compile.dequantize.default)
    register_backend()
    return manager


def register_for_model(model: torch.nn.Module, *, fuse: Optional[bool] = None, keep_sensitive: bool = True) -> NF4PassManager:
    """``register_inductor_passes`` with the sensitive layers of ``model`` (by ``policy.sensitive_layers``)."""
    sensitive = {**DEFAULT_SENSITIVE, **sensitive_layers(model)} if keep_sensitive else {}
    return register_inductor_passes(fuse, sensitive)


def apply(
    ep: ExportedProgram,
    sensitive: Optional[Iterable[str] | Mapping[str, str]] = None,
    *,
    fuse: bool = True,
    decompositions: Optional[dict] = None,
) -> ExportedProgram:
    """The nf4compile passes on an exported program of a quantized model; returns a new program.

    A program that still holds NF4Tensor weights (a plain ``torch.export.export``) is decomposed first
    (``decompositions`` as ``ExportedProgram.run_decompositions``), which exposes ``nf4compile.dequantize``.
    ``sensitive``: module names or patterns whose NF4 weights become dense parameters (default: lm_head).
    """
    from nf4compile.tensor import NF4Tensor

    weights = [*ep.state_dict.values(), *ep.constants.values()]
    if any(isinstance(t, NF4Tensor) for t in weights) or decompositions is not None:
        ep = ep.run_decompositions(decompositions)
    else:
        ep = copy_program(ep)  # FuseDequantMatmul edits the graph in place
    if sensitive is None:
        sensitive = DEFAULT_SENSITIVE
    elif not isinstance(sensitive, Mapping):
        sensitive = {name: "listed as sensitive" for name in sensitive}
    ep = KeepSensitiveBF16(sensitive).on_program(ep)
    if fuse_enabled(fuse) and FuseDequantMatmul()(ep.graph_module.graph):
        ep.graph_module.recompile()
    return ep
