"""A DLRM-style click-through-rate model on synthetic click logs drawn from a hidden ground-truth model.

Model (after Naumov et al., 2019): a bottom MLP embeds 13 dense features; one ``nn.EmbeddingBag`` (sum
of a multi-hot bag, ``padding_idx=0`` pads short bags) per categorical feature embeds 8 sparse features;
the 9 resulting 16-wide vectors interact through all pairwise dot products (a ``bmm``, lower triangle kept);
a top MLP turns the dense vector and the 36 dot products into a click logit. ~59k parameters, most of them
in the embedding tables.

Data: synthetic, generated from a fixed-seed ``torch.Generator`` (no download, identical on every machine):
13 Gaussian dense features and 8 categorical features with Zipf-distributed ids (a few hot ids and a long
tail, like real logs) in bags of 1-4 ids; 65,536 training and 8,192 eval impressions. The click label is a
Bernoulli draw from a hidden model (dense weights, a per-id popularity, and pairwise dot-product
interactions of hidden embeddings), so it is learnable but noisy: the hidden model itself scores an eval
AUC of 0.83 (:func:`oracle_auc`), the ceiling. ``evaluate`` returns ``auc`` (primary), ``accuracy`` and
``eval_loss`` (log loss).

Expected result (200 steps of 256 impressions, under one epoch): every arm reaches an eval AUC of ~0.73;
bf16 and fp16 within about 0.01 of fp32.

What the audit should find: a clean model, no error-severity flag. Embedding bags stay fp32 under
autocast; the interaction ``bmm`` and the MLPs run in reduced precision without trouble.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

DENSE_FEATURES = 13
CARDINALITIES = (1000, 1000, 500, 500, 200, 100, 50, 20)
"""Distinct ids per categorical feature (id 0 is the padding of a short bag)."""
MAX_BAG = 4
ZIPF_EXPONENT = 1.1
"""Id ``k`` of a feature is drawn with probability proportional to ``k ** -ZIPF_EXPONENT``."""
EMBED_DIM = 16
HIDDEN_DIM = 4
"""Width of the hidden ground-truth embeddings."""
FIRST_ORDER_SCALE = 1.0
SECOND_ORDER_SCALE = 0.15
"""Scales of the hidden model's first-order and interaction logits: learnable but noisy clicks."""
CLICK_RATE_BIAS = -1.5
"""Bias of the hidden logit: about 30% of impressions are clicked."""
TRAIN_SAMPLES = 65536
EVAL_SAMPLES = 8192
BATCH_SIZE = 256
LR = 1e-2
DATA_SEED = 1234
"""Seed of the generator that draws the hidden model and the click logs (fixed: the data never changes)."""


def _mlp(*widths: int, last_relu: bool) -> nn.Sequential:
    """Linear layers of the given widths with a ReLU between them (and after the last when ``last_relu``)."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*(layers if last_relu else layers[:-1]))


class DLRM(nn.Module):
    """Bottom MLP + per-feature EmbeddingBags + pairwise dot interaction + top MLP -> one logit."""

    def __init__(self) -> None:
        super().__init__()
        self.bottom = _mlp(DENSE_FEATURES, 64, EMBED_DIM, last_relu=True)
        self.embeddings = nn.ModuleList(
            nn.EmbeddingBag(card + 1, EMBED_DIM, mode="sum", padding_idx=0) for card in CARDINALITIES
        )
        self.vectors = len(CARDINALITIES) + 1
        pairs = self.vectors * (self.vectors - 1) // 2
        self.top = _mlp(EMBED_DIM + pairs, 64, 1, last_relu=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        vectors = [x] + [bag(sparse[:, i]) for i, bag in enumerate(self.embeddings)]
        t = torch.stack(vectors, dim=1)  # (batch, features, EMBED_DIM)
        rows, cols = torch.tril_indices(self.vectors, self.vectors, offset=-1, device=t.device)
        dots = torch.bmm(t, t.transpose(1, 2))[:, rows, cols]  # each pair once, no self-products
        return self.top(torch.cat([x, dots.to(x.dtype)], dim=1)).squeeze(1)


def _zipf_ids(gen: torch.Generator, card: int, shape: tuple[int, ...]) -> torch.Tensor:
    ranks = torch.arange(1, card + 1, dtype=torch.float64)
    probs = ranks.pow(-ZIPF_EXPONENT)
    ids = torch.multinomial(probs, int(torch.tensor(shape).prod()), replacement=True, generator=gen)
    return (ids + 1).view(shape)  # ids 1..card; 0 is padding


@lru_cache(maxsize=1)
def _dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, sparse, hidden logit, click) for train + eval samples, drawn once from ``DATA_SEED``."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    n = TRAIN_SAMPLES + EVAL_SAMPLES
    dense = torch.randn(n, DENSE_FEATURES, generator=gen)
    lengths = torch.randint(1, MAX_BAG + 1, (n, len(CARDINALITIES), 1), generator=gen)
    sparse = torch.stack([_zipf_ids(gen, card, (n, MAX_BAG)) for card in CARDINALITIES], dim=1)
    sparse = sparse * (torch.arange(MAX_BAG) < lengths)  # pad each bag after its length
    # the hidden model: first-order effects (dense weights, a per-id popularity) plus pairwise interactions
    w_dense = torch.randn(DENSE_FEATURES, generator=gen) / DENSE_FEATURES**0.5
    popularity = [torch.cat([torch.zeros(1), torch.randn(card, generator=gen)]) for card in CARDINALITIES]
    proj = torch.randn(DENSE_FEATURES, HIDDEN_DIM, generator=gen) / DENSE_FEATURES**0.5
    tables = [torch.cat([torch.zeros(1, HIDDEN_DIM), torch.randn(card, HIDDEN_DIM, generator=gen)])
              for card in CARDINALITIES]
    first = dense @ w_dense + sum(popularity[i][sparse[:, i]].mean(1) for i in range(len(CARDINALITIES)))
    vecs = torch.stack([dense @ proj] + [tables[i][sparse[:, i]].sum(1) for i in range(len(tables))], dim=1)
    gram = torch.bmm(vecs, vecs.transpose(1, 2))
    rows, cols = torch.tril_indices(vecs.shape[1], vecs.shape[1], offset=-1)
    second = gram[:, rows, cols].sum(1) / len(rows) ** 0.5
    logit = FIRST_ORDER_SCALE * first + SECOND_ORDER_SCALE * second + CLICK_RATE_BIAS
    click = torch.bernoulli(torch.sigmoid(logit), generator=gen)
    return dense, sparse, logit, click


def _split(train: bool) -> TensorDataset:
    dense, sparse, _, click = _dataset()
    part = slice(0, TRAIN_SAMPLES) if train else slice(TRAIN_SAMPLES, None)
    return TensorDataset(dense[part], sparse[part], click[part])


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random click scores above a random non-click (rank formula)."""
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def oracle_auc() -> float:
    """The eval AUC of the hidden model that drew the clicks: the ceiling a learned model approaches."""
    _, _, logit, click = _dataset()
    return auc(logit[TRAIN_SAMPLES:], click[TRAIN_SAMPLES:])


def build_model() -> nn.Module:
    return DLRM()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def train_loader() -> DataLoader:
    data = _split(train=True)
    # whole batches indexed at once (a per-sample DataLoader spends longer collating than this model trains)
    return DataLoader(data, batch_size=None, sampler=BatchSampler(RandomSampler(data), BATCH_SIZE, drop_last=False))


def eval_loader() -> DataLoader:
    return DataLoader(_split(train=False), batch_size=2048)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    dense, sparse, click = batch
    return nn.functional.binary_cross_entropy_with_logits(model(dense, sparse).float(), click)


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    """Eval AUC (primary), accuracy at a 0.5 threshold and mean log loss."""
    device = next(model.parameters()).device
    scores, labels = [], []
    for dense, sparse, click in loader:
        scores.append(model(dense.to(device), sparse.to(device)).float().cpu())
        labels.append(click)
    s, y = torch.cat(scores), torch.cat(labels)
    return {
        "auc": auc(s, y),
        "accuracy": float(((s > 0).float() == y).float().mean()),
        "eval_loss": float(nn.functional.binary_cross_entropy_with_logits(s, y)),
    }
