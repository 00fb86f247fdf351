"""Small models, state checks and numerics shared by the tests."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from nf4compile import NF4Tensor


def bench_script(name: str):
    """bench/<name>.py as a fresh module (its own globals and start time), for the tests that keep it from rotting."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=64, hidden=96, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.small = nn.Linear(dim, 4)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(h) + self.small(h).sum(-1, keepdim=True)


def _tensors(model):
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _contents(t):
    """The bytes a tensor holds (an NF4Tensor: its inner tensors'); None on the meta device."""
    if isinstance(t, NF4Tensor):
        return tuple(_contents(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return None if t.is_meta else t.detach().clone()


def state(model):
    """What a failed quantize/load must leave as it was: every parameter and buffer (tied names too)
    as the object itself, its type, dtype, device, shape and contents."""
    return {k: (v, type(v), v.dtype, v.device, v.shape, _contents(v)) for k, v in _tensors(model).items()}


def _same_contents(a, b):
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_contents(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def assert_unchanged(model, before):
    after = _tensors(model)
    assert after.keys() == before.keys()
    for key, (obj, kind, dtype, device, shape, contents) in before.items():
        assert after[key] is obj, f"{key}: replaced by another tensor"
        assert (type(obj), obj.dtype, obj.device, obj.shape) == (kind, dtype, device, shape), key
        assert _same_contents(_contents(obj), contents), key  # bitwise, NaN included


def assert_refused_unchanged(model, error, message, action):
    """``action()`` raises ``error`` matching ``message`` and leaves ``model`` exactly as it was."""
    import pytest

    before = state(model)
    with pytest.raises(error, match=message):
        action()
    assert_unchanged(model, before)


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), NF4Tensor))


def deepcopy(model):
    return copy.deepcopy(model)


def rel_err(out, ref) -> float:
    """Relative Frobenius error of ``out`` against a float64 ``ref`` (absolute where ``ref`` is zero)."""
    assert not out.isnan().any(), "NaN in output (unwritten or poisoned element)"
    diff, norm = (out.double() - ref).norm().item(), ref.norm().item()
    return diff / norm if norm else diff


def run_under_interpreter(test_file, *pytest_args):
    """Run ``test_file``'s tests again with TRITON_INTERPRET=1 (Triton kernels on CPU tensors). The
    variable must be set before Triton is imported (its own @jit helpers are decorated at import) and
    conftest.py imports the package first, hence a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=Path(__file__).parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
