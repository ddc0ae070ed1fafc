"""Pure bf16 training loses small updates: the phenomenon behind the ``bf16-pure`` arm, in plain PyTorch.

An MLP on scikit-learn's digits (64 -> 128 -> 128 -> 10, every weight and bias drawn from N(0, 0.1)) trained by
AdamW at lr 2e-5 for 600 steps, from the same weights on the same batches, five ways: fp32; bf16 autocast with fp32
master weights; pure bf16 (model and AdamW state in bf16); and pure bf16 with the updates kept by
``mpaudit.bf16_optimizer`` (stochastic rounding, Kahan compensation, fp32 master copies). With ``--torchao`` (and
torchao installed) also torchao's ``_AdamW(bf16_stochastic_round=True)``, which compiles its step first (slow on a
CPU). Prints the test accuracy of each. Not a speed goal: ``nox -s bench`` does not run it.

    python benchmarks/bf16_pure.py [--steps 600] [--lr 2e-5] [--torchao]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "suites"))
from digits_data import loaders

import mpaudit


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 0.1)
    return model


def batches(steps: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
    torch.manual_seed(1)
    train, test = loaders(image=False)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < steps:
        out += list(train)
    return out[:steps], test


def accuracy(model: nn.Module, test: object) -> float:
    model = model.float().eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test:  # type: ignore[attr-defined]
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def train(way: str, steps: int, lr: float) -> float:
    model = build()
    data, test = batches(steps)
    pure = way.startswith("pure")
    if pure:
        model = model.to(torch.bfloat16)

    def adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=lr)

    if way == "pure+torchao-sr":
        from torchao.optim import _AdamW

        optimizer: torch.optim.Optimizer = _AdamW(model.parameters(), lr=lr, bf16_stochastic_round=True)
    elif way == "pure+sr":
        optimizer = mpaudit.bf16_optimizer(model, adamw, rounding="stochastic")
    elif way == "pure+kahan":
        optimizer = mpaudit.bf16_optimizer(model, adamw, rounding="kahan")
    elif way == "pure+master":
        optimizer = mpaudit.bf16_optimizer(model, adamw, fp32_master=["0", "2", "4"])
    else:
        optimizer = adamw(model)
    for x, y in data:
        if pure:
            loss = nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=way == "bf16"):
                loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return accuracy(model, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--torchao", action="store_true", help="also torchao's _AdamW(bf16_stochastic_round=True)")
    args = parser.parse_args()
    ways = ["fp32", "bf16", "pure", "pure+sr", "pure+kahan", "pure+master"]
    if args.torchao:
        ways.append("pure+torchao-sr")
    print(f"digits MLP, weights N(0, 0.1), AdamW lr {args.lr:g}, {args.steps} steps: test accuracy")
    for way in ways:
        t0 = time.perf_counter()
        print(f"  {way:16s} {train(way, args.steps, args.lr):.4f}   ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
