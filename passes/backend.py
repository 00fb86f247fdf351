"""``torch.compile(model, backend="nf4compile")``: Inductor with the nf4compile passes, explicitly.

Found by dynamo through the ``torch_dynamo_backends`` entry point (pyproject.toml) of an installed
nf4compile, and registered by name by ``register_inductor_passes()`` otherwise. Unlike the global hook it
changes no global config: the passes are patched in for this compilation only, wrapping a pass the user set.
"""

from __future__ import annotations

from typing import Optional

import torch

from nf4compile.passes.manager import joint_manager_for, manager_for


def nf4compile_backend(
    gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None
):
    """Inductor (``compile_fx``) with our post-grad and joint-graph passes; ``mode`` and ``options`` as for Inductor."""
    from torch._inductor import config, list_mode_options
    from torch._inductor.compile_fx import compile_fx

    options = {**(list_mode_options(mode) if mode else {}), **(options or {})}
    current = options.pop("post_grad_custom_pre_pass", config.post_grad_custom_pre_pass)
    joint = options.pop("joint_custom_pre_pass", config.joint_custom_pre_pass)
    patches = {**options, "post_grad_custom_pre_pass": manager_for(current), "joint_custom_pre_pass": joint_manager_for(joint)}
    return compile_fx(gm, example_inputs, config_patches=patches)


def register_backend() -> None:
    from torch._dynamo.backends import registry

    if "nf4compile" not in registry._COMPILER_FNS:
        registry.register_backend(nf4compile_backend, name="nf4compile")
