"""An LSTM sentence classifier: token embedding, a 2-layer ``nn.LSTM``, a linear head on the last hidden state.

Model: ``nn.Embedding(64, 32)``, ``nn.LSTM(32, 64, num_layers=2, batch_first=True)``, ``nn.Linear(64, 2)`` on the
top layer's final hidden state; 60.5k parameters. Under autocast the LSTM runs in reduced precision (CUDA autocast
sends recurrent layers to fp16/bf16; on a CPU the fp16 arm computes them with mpaudit's fp16 emulation, step by
step as a GPU does).

Data: synthetic, generated from a fixed-seed ``torch.Generator`` (no download, identical on every machine): "sentences"
of 16 words from a 64-word vocabulary, mostly neutral filler, with 1 or 3 sentiment words (8 positive, 8 negative),
each preceded by the word "not" with probability 0.3, which flips it. The label is the sign of the summed,
negation-aware sentiment, so word order matters (a bag of words cannot tell "not good ... bad" from
"good ... not bad"). 8,192 training and 2,048 eval sentences, batches of 64. ``evaluate`` returns ``accuracy``
(primary) and ``eval_loss``.

Expected result (measured with ``mpaudit suite suites -k lstm_classifier``: 200 steps, AdamW at 3e-3, a 2-core CPU):
eval accuracy fp32 0.9966, bf16 0.9927, fp16 (emulated) 0.9976; the classes are balanced (51% / 53% positive in
training / eval).

What the audit should find: a clean model, no error-severity flag; the fp16 arm runs emulated on a CPU
(``fp16_mode: emulated``), its LSTM computed in fp16 with the hidden state rounded at every time step.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 64
POSITIVE = range(1, 9)
NEGATIVE = range(9, 17)
NOT = 17
FILLER = (18, VOCAB)
"""Neutral words: ids 18..63 (id 0 is unused)."""
LENGTH = 16
NEGATION_P = 0.3
TRAIN_SAMPLES = 8192
EVAL_SAMPLES = 2048
BATCH_SIZE = 64
EMBED_DIM = 32
HIDDEN = 64
LR = 3e-3
DATA_SEED = 4321


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED_DIM)
        self.lstm = nn.LSTM(EMBED_DIM, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.head(h[-1])


def _sentences(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(*FILLER, (n, LENGTH), generator=g)
    labels = torch.empty(n, dtype=torch.long)
    for row in range(n):
        k = 1 + 2 * int(torch.randint(2, (1,), generator=g))  # 1 or 3 sentiment words: the sum is never 0
        slots = torch.randperm(LENGTH // 2 - 1, generator=g)[:k].sort().values * 2 + 1  # odd positions: room for "not"
        score = 0
        for pos in slots.tolist():
            positive = bool(torch.rand(1, generator=g) < 0.5)
            words = POSITIVE if positive else NEGATIVE
            tokens[row, pos] = words[int(torch.randint(len(words), (1,), generator=g))]
            sign = 1 if positive else -1
            if torch.rand(1, generator=g) < NEGATION_P:
                tokens[row, pos - 1] = NOT
                sign = -sign
            score += sign
        labels[row] = int(score > 0)
    return tokens, labels


@lru_cache(maxsize=1)
def _data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(DATA_SEED)
    return _sentences(TRAIN_SAMPLES, g), _sentences(EVAL_SAMPLES, g)


def build_model() -> nn.Module:
    return LSTMClassifier()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def train_loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data()[0]), batch_size=BATCH_SIZE, shuffle=True)


def eval_loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data()[1]), batch_size=512)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, labels = batch
    return nn.functional.cross_entropy(model(tokens), labels)


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    correct = total = 0
    loss_sum = 0.0
    for tokens, labels in loader:
        logits = model(tokens).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    return {"accuracy": correct / total, "eval_loss": loss_sum / total}
