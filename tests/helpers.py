"""Small models and state checks shared by the tests."""

import copy

import torch
from torch import nn

from nf4compile import NF4Tensor


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


def state(model):
    return {k: (v.clone(), v.dtype, type(v)) for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model, before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, (value, dtype, kind) in before.items():
        assert type(after[key]) is kind and after[key].dtype == dtype, key
        assert after[key].view(torch.uint8).equal(value.view(torch.uint8)), key  # bitwise, NaN included


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), NF4Tensor))


def deepcopy(model):
    return copy.deepcopy(model)
