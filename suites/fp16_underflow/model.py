"""Numerics showcase: a doubly normalised loss whose gradients underflow fp16 at GradScaler's default scale.

Model: a character-level neural language model (Bengio et al., 2003): the previous 8 characters are
embedded (16 wide), concatenated and fed through two tanh layers of 128 to logits over 128 characters.

The bug: ``loss_fn`` takes the usual per-token **mean** cross-entropy over the micro-batch (2,048 tokens)
and then divides it again by the token count of the global batch the recipe was written for,
``GLOBAL_BATCH_TOKENS`` = 2^23 (about 8M tokens, an LLM-sized global batch), as the script did when the
loss was a sum. Every gradient is therefore 2^23 times smaller than it should be. AdamW divides a
gradient's scale out, so fp32 and bf16 (which has fp32's exponent range) train exactly as with the
correct loss, given an ``eps`` scaled down with it: ``ADAM_EPS`` = 1e-8 / 2^23 (with PyTorch's default 1e-8
such small gradients would stall fp32 as well, hiding the fp16 effect under an optimizer one).

Data: 7-bit ASCII text of a fixed list of Python standard-library modules (``suites/stdlib_text.py``; no
download), split by file. ``evaluate`` returns held-out ``perplexity`` (primary, lower is better) and
``eval_loss`` (nats per character).

Expected result (200 steps):
  * fp32 and bf16 reach a held-out perplexity of ~8.5.
  * fp16 with ``torch.amp.GradScaler()`` at its defaults (``init_scale`` 2^16, doubling only after
    ``growth_interval`` = 2000 clean steps) learns markedly worse: perplexity ~13. No step overflows, so
    the scale never moves. A logit's gradient is (p - y) / (2^11 * 2^23) = (p - y) * 2^-34; times 2^16 it is
    (p - y) * 2^-18, below fp16's smallest normal number 2^-14: the target logits' gradients keep only a few
    significant bits, every logit with p < 2^-7 gets a gradient below half the smallest subnormal (2^-25)
    and flushes to zero, and a large part of the hidden layers' gradients flush with them.

What the audit should find: error-severity ``gradient_underflow`` flags on the output layer (``mlp.4``)
and every layer below it down to ``emb`` in the fp16 arm, and a ``loss_scale`` flag recommending a
larger scale (about 2^28); no overflow and no skipped step; fp16's perplexity well above fp32's, so its
verdict is "not safe".

The fix: drop the second division (the real bug); or give GradScaler a scale that lifts these gradients
into fp16's range, ``torch.amp.GradScaler(init_scale=2.0**28)`` (fp16 then matches fp32: perplexity 8.49);
or train in bf16.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stdlib_text import ASCII_VOCAB, tokens

CONTEXT = 8
EMBED = 16
HIDDEN = 128
MICRO_BATCH_TOKENS = 2048
"""Tokens predicted per step (one per example); the loss is their mean."""
GLOBAL_BATCH_TOKENS = 2**23
"""The global batch the loss is (wrongly, a second time) normalised by."""
LR = 2e-3
ADAM_EPS = 1e-8 / GLOBAL_BATCH_TOKENS
"""PyTorch's default eps (1e-8) scaled down with the loss, so fp32 trains exactly as default AdamW on the
correct loss (with eps left at 1e-8 it would dwarf these gradients and stall fp32 as well)."""
EVAL_EXAMPLES = 16384


class CharMLP(nn.Module):
    """Embed the previous ``CONTEXT`` characters, two tanh layers, logits over the next character."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(ASCII_VOCAB, EMBED)
        self.mlp = nn.Sequential(
            nn.Linear(CONTEXT * EMBED, HIDDEN), nn.Tanh(),
            nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
            nn.Linear(HIDDEN, ASCII_VOCAB),
        )

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(context).flatten(1))


def _examples(split: str) -> torch.Tensor:
    """Every position of the text as ``CONTEXT`` characters followed by the one to predict."""
    return tokens(split).unfold(0, CONTEXT + 1, 1)


def build_model() -> nn.Module:
    return CharMLP()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)


def train_loader() -> DataLoader:
    data = TensorDataset(_examples("train"))
    sampler = BatchSampler(RandomSampler(data), MICRO_BATCH_TOKENS, drop_last=False)
    return DataLoader(data, batch_size=None, sampler=sampler)


def eval_loader() -> DataLoader:
    examples = _examples("eval")
    pick = torch.linspace(0, len(examples) - 1, EVAL_EXAMPLES).long()
    return DataLoader(TensorDataset(examples[pick]), batch_size=4096)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    (example,) = batch
    mean_loss = F.cross_entropy(model(example[:, :-1]), example[:, -1])
    return mean_loss / GLOBAL_BATCH_TOKENS  # the bug: a mean is normalised a second time


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    """Held-out perplexity (primary) and mean cross-entropy per character, of the unnormalised loss."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for (example,) in loader:
        example = example.to(device)
        logits = model(example[:, :-1]).float()
        total += F.cross_entropy(logits, example[:, -1], reduction="sum").item()
        count += len(example)
    loss = total / count
    return {"perplexity": math.exp(loss), "eval_loss": loss}
