"""A tiny GPT-2 built from a config with Hugging Face ``transformers``, trained as an HF user would train it.

Model: ``GPT2LMHeadModel(GPT2Config(...))``: 2 layers, 128 wide, 4 heads, context 64, byte vocabulary
(256 tokens, so no tokenizer and nothing to download), dropout off so the arms differ only in precision.
Batches are ``transformers.BatchEncoding`` dicts of ``input_ids``, ``attention_mask`` and ``labels``, and
``loss_fn`` is the usual ``model(**batch).loss``: this workload runs unchanged code from the HF world.

Data: UTF-8 bytes of a fixed list of Python standard-library modules (``suites/stdlib_text.py``), split by
file. ``evaluate`` returns held-out ``perplexity`` (primary, per byte, lower is better) and ``eval_loss``.

Expected result (200 steps): every arm goes from perplexity 256 (uniform over bytes) to ~8.5;
bf16 and fp16 within 1% of fp32.

What the audit should find: a clean model, no error-severity flag (the key bias of
``transformer.h.*.attn.c_attn`` has a gradient that is zero in exact arithmetic, as in ``char_transformer``;
its fp32 rounding noise is below ``noise_grad_ratio`` of the layer's gradients and is not flagged).

Needs the optional ``transformers`` package (``pip install transformers``; it does not change torch).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BatchEncoding, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stdlib_text import BYTE_VOCAB, eval_windows, tokens, windows

CONTEXT = 64
BATCH_SIZE = 32
LR = 1e-3


def config() -> GPT2Config:
    """The model's shape; every dropout is off so the arms differ only in precision."""
    return GPT2Config(
        vocab_size=BYTE_VOCAB, n_positions=CONTEXT, n_embd=128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )


def build_model() -> nn.Module:
    return GPT2LMHeadModel(config())


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def _collate(rows: list[tuple[torch.Tensor]]) -> BatchEncoding:
    """Rows of ``CONTEXT`` byte ids -> the dict an HF causal LM takes (it shifts ``labels`` itself)."""
    ids = torch.stack([row for (row,) in rows])
    return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})


def train_loader() -> DataLoader:
    rows = windows(tokens("train", "bytes"), CONTEXT - 1)
    return DataLoader(TensorDataset(rows), batch_size=BATCH_SIZE, shuffle=True, collate_fn=_collate)


def eval_loader() -> DataLoader:
    rows = eval_windows(tokens("eval", "bytes"), CONTEXT - 1)
    return DataLoader(TensorDataset(rows), batch_size=128, collate_fn=_collate)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    """Held-out perplexity per byte (primary) and mean cross-entropy, from the model's own loss."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        n = batch["labels"][:, 1:].numel()  # the model predicts every position but the first
        total += model(**batch).loss.float().item() * n
        count += n
    loss = total / count
    return {"perplexity": math.exp(loss), "eval_loss": loss}
