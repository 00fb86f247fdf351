"""Module names from the names that graphs give to layers and weights.

Graphs name the same layer differently: dynamo's ``nn_module_stack`` says ``L['self'].model.layers[0].q_proj``
(or ``L['self']._modules['model']...``), an exported program's placeholders say
``p_model_layers_0_q_proj_weight`` and its signature ``model.layers.0.q_proj.parametrizations.weight.original0``
(an NF4Tensor parameter, unwrapped into its inner tensors). The policy in ``nf4compile.policy`` works on
module names (``model.layers.0.q_proj``), so every pass normalizes to those first.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

# Inner tensors of an unwrapped NF4Tensor parameter, in ``NF4Tensor.__tensor_flatten__`` order.
_PARAMETRIZATION = re.compile(r"(^|\.)parametrizations\.(\w+)\.original(\d+)$")
_ROOT = re.compile(r"^[LG]\[['\"][^'\"]*['\"]\]\.?")  # L['self'], G['model']
_GETATTR = re.compile(r"getattr\(([^,]+), ['\"]([^'\"]+)['\"]\)")


def module_name(graph_name: str, known: Iterable[str] = ()) -> str:
    """The dotted module (or parameter) name behind a graph's name for it.

    ``known`` (module or parameter names of the model) resolves mangled names such as
    ``p_lm_head_weight`` or ``L__self___model_layers_0``, whose underscores are ambiguous.
    """
    name = graph_name
    while (m := _GETATTR.search(name)) is not None:  # getattr(L['self'].layers, '0')
        name = name[: m.start()] + f"{m.group(1)}.{m.group(2)}" + name[m.end():]
    name = _ROOT.sub("", name)
    name = re.sub(r"_modules\[['\"]([^'\"]+)['\"]\]", r"\1", name)
    name = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", name)  # layers[0] -> layers.0
    name = name.strip(".").replace("..", ".")
    name = _PARAMETRIZATION.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)
    if "." not in name and known:
        mangled = {_mangle(k): k for k in known}
        for prefix in ("", "p_", "b_", "c_", "L__self___", "l__self___"):
            if name.startswith(prefix) and _mangle(name[len(prefix):]) in mangled:
                return mangled[_mangle(name[len(prefix):])]
    return name


def _mangle(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def inner_tensor_index(target: str) -> Optional[int]:
    """i for ``...parametrizations.weight.original{i}`` (an NF4 inner tensor), else None."""
    m = _PARAMETRIZATION.search(target)
    return int(m.group(3)) if m else None


def layer_of_weight(weight_name: str) -> str:
    """``model.lm_head.weight`` -> ``model.lm_head``."""
    return weight_name.rpartition(".")[0]


def layer_of_node(node: torch.fx.Node) -> Optional[str]:
    """The innermost module that produced ``node`` in a dynamo-traced graph, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return module_name(path)
