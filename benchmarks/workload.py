"""The matmul-bound MLP every benchmark measures: 1024 -> 4096 -> 4096 -> 10 with ReLU, batch 256, AdamW."""

from __future__ import annotations

import itertools
import types
from pathlib import Path

import torch
from torch import nn

from mpaudit.run.task import Task

WIDTHS = (1024, 4096, 4096, 10)
"""Layer widths of the benchmark MLP."""
BATCH = 256
SEED = 0


def mlp() -> nn.Module:
    """The benchmark MLP in fp32."""
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(itertools.pairwise(WIDTHS)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(w_in, w_out))
    return nn.Sequential(*layers)


def batch(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed (x, y) batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine slows every arm alike)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def mlp_task(name: str) -> Task:
    """An in-memory task: the MLP, one fixed batch, cross-entropy, AdamW (the contract's default optimizer)."""
    module = types.ModuleType(name)

    def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = b
        return nn.functional.cross_entropy(model(x), y)

    module.build_model = mlp  # type: ignore[attr-defined]
    module.train_loader = lambda: [batch()]  # type: ignore[attr-defined]
    module.loss_fn = loss_fn  # type: ignore[attr-defined]
    return Task(path=Path(f"{name}.py"), sha256="", module=module)


# Models with many small layers, for the tracing benchmark: a traced step's cost follows the number of traced
# tensors, which these have plenty of (the MLP above has five large layers).

MANY_BLOCKS = 200
"""Blocks of ``Linear(64, 64)`` + ReLU in :func:`many_layers` (400 leaf modules, plus the head)."""
MANY_WIDTH = 64
MANY_BATCH = 32


def many_layers() -> nn.Module:
    """200 x (Linear 64 -> 64 + ReLU), then a Linear 64 -> 10 head: 401 leaf modules, all of them small."""
    layers: list[nn.Module] = []
    for _ in range(MANY_BLOCKS):
        layers += [nn.Linear(MANY_WIDTH, MANY_WIDTH), nn.ReLU()]
    layers.append(nn.Linear(MANY_WIDTH, 10))
    return nn.Sequential(*layers)


def many_batch(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed (x, y) batch for :func:`many_layers`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(MANY_BATCH, MANY_WIDTH, generator=g), torch.randint(0, 10, (MANY_BATCH,), generator=g)


GPT2_CONTEXT = 32
GPT2_BATCH = 8
GPT2_VOCAB = 256


def gpt2_tiny() -> nn.Module:
    """A GPT-2 built from a config (nothing downloads): 2 blocks, 64 wide, 4 heads, byte vocabulary, no dropout.

    Needs the optional ``transformers`` package.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=GPT2_CONTEXT, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def gpt2_batch(seed: int = SEED) -> dict[str, torch.Tensor]:
    """One fixed batch of random byte ids, as an HF causal LM takes it (it shifts ``labels`` itself)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, GPT2_VOCAB, (GPT2_BATCH, GPT2_CONTEXT), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


class TinyDecoder(nn.Module):
    """A torch-only stand-in for :func:`gpt2_tiny` when ``transformers`` is missing: byte embeddings, 2 pre-norm
    causal ``nn.TransformerEncoderLayer`` blocks (64 wide, 4 heads, 256 hidden, no dropout) and a byte head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(GPT2_VOCAB, 64)
        self.positions = nn.Embedding(GPT2_CONTEXT, 64)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True, norm_first=True) for _ in range(2)
        )
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, GPT2_VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        x = self.tokens(input_ids) + self.positions(torch.arange(n, device=input_ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=input_ids.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, GPT2_VOCAB), labels[:, 1:].reshape(-1))
