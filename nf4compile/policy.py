"""Which layers hold NF4 weights, and which must stay in their original precision.

Shared by ``quantize``, ``load`` and the graph passes, so that all three agree on what is sensitive.
Like transformers' bitsandbytes integration: only ``nn.Linear`` and transformers' ``Conv1D`` are
quantized (norms and embeddings never are), and the layer that produces the logits (``lm_head``, the
output embeddings) and any weight tied to the input embeddings stay dense.
"""

from __future__ import annotations

import re
import sys
from typing import Iterable, Iterator, Optional

from torch import nn

SENSITIVE_NAMES = ("lm_head",)


def conv1d_type() -> Optional[type]:
    """transformers' Conv1D (GPT-2), if transformers is loaded (a model holding one imported it)."""
    if "transformers" not in sys.modules:
        return None
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def quantizable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv1D that has a weight."""
    kinds = tuple(t for t in (nn.Linear, conv1d_type()) if t is not None)
    for name, module in model.named_modules():
        if isinstance(module, kinds) and getattr(module, "weight", None) is not None:
            yield name, module


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix ("lm_head" matches
    "model.lm_head"), or as a regular expression matching the whole name."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            pass
    return False


def sensitive_layers(model: nn.Module, extra: Iterable[str] = ()) -> dict[str, str]:
    """{module name: why it stays dense} for the layers that must keep full precision."""
    reasons: dict[str, str] = {}
    layers = dict(quantizable_layers(model))
    extra = tuple(extra)
    output_embeddings = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output_embeddings = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in layers.items():
        if module is output_embeddings:
            reasons[name] = "output embeddings (produces the logits)"
        elif name_matches(name, SENSITIVE_NAMES):
            reasons[name] = "lm_head (produces the logits)"
        elif id(module.weight) in embedding_weights:
            reasons[name] = "weight tied to the input embeddings"
        elif extra and name_matches(name, extra):
            reasons[name] = "listed as sensitive"
    return reasons
