"""Text that ships with every Python: the source of a fixed list of standard-library modules (no download).

Shared by the language-model workloads. The split is by file, so the held-out text is code the model never
saw: ``TRAIN_MODULES`` train, ``EVAL_MODULES`` evaluate. Each training example is a window of
``context + 1`` tokens (inputs and next-token targets); windows do not overlap. The exact text depends on
the Python version (the stdlib changes between releases), so metrics move slightly across versions.
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

TRAIN_MODULES = (
    "argparse.py", "collections/__init__.py", "functools.py", "dataclasses.py", "enum.py",
    "fractions.py", "statistics.py", "shutil.py", "tempfile.py", "random.py", "contextlib.py",
    "configparser.py", "tokenize.py", "logging/__init__.py", "optparse.py", "heapq.py",
)
EVAL_MODULES = ("textwrap.py", "csv.py", "queue.py", "pprint.py")

ASCII_VOCAB = 128
"""Vocabulary of the ``ascii`` encoding: one token per 7-bit character; any other character becomes ``?``."""
BYTE_VOCAB = 256
"""Vocabulary of the ``bytes`` encoding: one token per UTF-8 byte."""

EVAL_WINDOWS = 256
"""Held-out windows scored by ``evaluate`` (spread evenly over the held-out text), enough for a stable perplexity."""


def stdlib_dir() -> Path:
    """The folder of this interpreter's standard library (the base install's, also inside a virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=4)
def _read(split: str) -> str:
    names = TRAIN_MODULES if split == "train" else EVAL_MODULES
    found = [stdlib_dir() / n for n in names if (stdlib_dir() / n).is_file()]
    if not found:
        raise FileNotFoundError(f"none of {names} is under {stdlib_dir()}; this Python ships without its stdlib source")
    return "\n".join(p.read_text(encoding="utf-8") for p in found)


def tokens(split: str, encoding: str = "ascii") -> torch.Tensor:
    """The ``train`` or ``eval`` text as one int64 tensor of token ids under ``encoding`` (``ascii`` or ``bytes``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    text = _read(split)
    if encoding == "ascii":
        data = text.encode("ascii", errors="replace")
    elif encoding == "bytes":
        data = text.encode("utf-8")
    else:
        raise ValueError(f"encoding must be 'ascii' or 'bytes', not {encoding!r}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(ids: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows of ``context + 1`` tokens, shape ``(n, context + 1)``."""
    n = (len(ids) - 1) // context
    return torch.stack([ids[i * context : i * context + context + 1] for i in range(n)])


def eval_windows(ids: torch.Tensor, context: int, count: int = EVAL_WINDOWS) -> torch.Tensor:
    """``count`` windows spread evenly over the held-out text (all of them when there are fewer)."""
    all_windows = windows(ids, context)
    if len(all_windows) <= count:
        return all_windows
    pick = torch.linspace(0, len(all_windows) - 1, count).long()
    return all_windows[pick]
