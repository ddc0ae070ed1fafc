"""A character-level transformer language model on the Python standard library's own source code.

Model: GPT-style decoder, 2 blocks of pre-LayerNorm multi-head causal self-attention and a GELU MLP,
token + learned position embeddings, and an output head **tied** to the token embedding
(``head.weight is tok_emb.weight``). 128-wide, 4 heads, context 64, ~0.4M parameters.

Data: the source of a fixed list of stdlib modules (``suites/stdlib_text.py``; present on every Python,
no download), 7-bit ASCII characters (anything else becomes ``?``), split by file: held-out modules are
scored. ``evaluate`` returns ``perplexity`` (primary, lower is better) and ``eval_loss`` (nats per char).

Expected result (200 steps): every arm goes from perplexity 128 (uniform) to ~8.5 on held-out code;
bf16 and fp16 within 1% of fp32.

What the audit should find: a clean model, no error-severity flag. Attention, LayerNorm and softmax
stay in range in fp16; the tied embedding gets gradient from both its uses in every arm. The key third
of ``blocks.*.attn.qkv``'s bias gets a gradient that is exactly zero in exact arithmetic (softmax ignores
a constant added to a query's scores), so fp32 sees only rounding noise there (~1e-11), some of it below
fp16's range at a 2^16 scale; the rules treat values that far below the layer's gradients as noise
(threshold ``noise_grad_ratio``), so no flag.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stdlib_text import ASCII_VOCAB, eval_windows, tokens, windows

CONTEXT = 64
WIDTH = 128
HEADS = 4
LAYERS = 2
BATCH_SIZE = 32
LR = 1e-3
INIT_STD = 0.02
"""GPT-2's initialisation: weights ~ N(0, 0.02), biases zero."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token + position embeddings, ``LAYERS`` blocks, final LayerNorm, head tied to the token embedding."""

    def __init__(self, vocab: int = ASCII_VOCAB, width: int = WIDTH, heads: int = HEADS,
                 layers: int = LAYERS, context: int = CONTEXT) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input/output embedding
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model() -> nn.Module:
    return CharTransformer()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def train_loader() -> DataLoader:
    return DataLoader(TensorDataset(windows(tokens("train"), CONTEXT)), batch_size=BATCH_SIZE, shuffle=True)


def eval_loader() -> DataLoader:
    return DataLoader(TensorDataset(eval_windows(tokens("eval"), CONTEXT)), batch_size=128)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    (chunk,) = batch
    logits = model(chunk[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())


def evaluate(model: nn.Module, loader: Any) -> dict[str, float]:
    """Held-out perplexity (primary) and mean cross-entropy per character, computed in fp32."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for (chunk,) in loader:
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    loss = total / count
    return {"perplexity": math.exp(loss), "eval_loss": loss}
