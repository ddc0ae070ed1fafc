"""Running the audit under ``torch.distributed``: one process per device, launched by ``torchrun``.

Every rank runs the whole audit in lockstep (same arms, same seeds, same number of steps), each on its
shard of the training data, with the model wrapped in DDP or FSDP2's ``fully_shard``. What differs
between ranks is reduced so that every rank ends up with the same :class:`~mpaudit.results.model.AuditResult`:

- training losses: the mean over ranks, every step (one scalar all-reduce beside the step's host sync);
- per-layer statistics: every statistic merges (counts and histograms add, maxima max, minima min), so a
  traced step's statistics are merged by two all-reduces of packed buffers (a sum and a max);
- metrics: every rank evaluates the whole eval set (ranks hold the same weights), rank 0's are kept;
- speed and memory: measured per rank; the report shows the slowest rank and every rank's figures.

Only rank 0 writes files; the other ranks print nothing but errors.

A failure on one rank must not hang the others: the failing rank writes its error to the job's key-value
store and exits, which breaks every pending collective; rank 0 then reads who failed, writes the arms
finished so far and exits with :data:`EXIT_RANK_FAILED`. A rank that hangs without failing is caught by
the process group's timeout (``--dist-timeout``).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from mpaudit.defaults import DEFAULT_DIST_TIMEOUT_S
from mpaudit.errors import EXIT_FILE_ENV, EXIT_INTERNAL, EXIT_RANK_FAILED, MpauditError, UsageError, error_text

PARALLEL_KINDS = ("auto", "none", "ddp", "fsdp")
"""``--parallel``: ``auto`` is DDP when the world has more than one rank, none otherwise."""


FAILURE_LOOKUP_S = 5.0
"""How long a rank whose collective broke waits for the failing rank's error to appear in the store."""

_FAILURE_KEY = "mpaudit/failure/"

_FAILING = threading.Event()
"""Set once this process is on the failure path: a SIGTERM then no longer interrupts it (rank 0 must still
write the arms that finished; torchrun's SIGKILL 30 s after its SIGTERM remains the bound)."""


def check_options(parallel: str, timeout_s: float) -> None:
    """UsageError for an unknown ``--parallel`` or a ``--dist-timeout`` that is not a positive number."""
    if parallel not in PARALLEL_KINDS:
        raise UsageError(f"--parallel must be one of {', '.join(PARALLEL_KINDS)}, not {parallel!r}.")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise UsageError("--dist-timeout must be a positive number of seconds.")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class RankFailed(MpauditError):
    """A rank of a distributed audit failed; the audit stops and keeps what finished before."""

    def __init__(self, rank: int, error: str, arm: str | None) -> None:
        self.rank, self.error, self.arm = rank, error, arm
        self.result: Any = None
        """The partial :class:`~mpaudit.results.model.ArmResult` of the arm that was training, when there was one."""
        where = f" in {arm}" if arm else ""
        super().__init__(f"rank {rank} failed{where}: {error}")


class Terminated(Exception):
    """Rank 0 received SIGTERM (torchrun stops the job when another rank exited with an error)."""


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job. ``Parallel()`` is the single-process default: every method is a no-op."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    kind: str = "none"
    backend: str | None = None
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    _store: Any = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """True when more than one rank takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes the report."""
        return self.rank == 0

    @property
    def params_replicated(self) -> bool:
        """Whether every rank holds every full parameter gradient (DDP), rather than a shard of it (FSDP)."""
        return self.kind != "fsdp"

    # ------------------------------------------------------------------ set-up

    @classmethod
    def from_env(
        cls, parallel: str = "auto", timeout_s: float = DEFAULT_DIST_TIMEOUT_S, device_type: str = "cpu"
    ) -> Parallel:
        """The job this process belongs to, from torchrun's variables (``WORLD_SIZE``, ``LOCAL_RANK``, ...).

        Initialises the default process group (NCCL for ``device_type`` cuda, gloo for cpu) when the world
        has more than one rank and no group exists yet. Without torchrun this is a single process.
        """
        check_options(parallel, timeout_s)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            if parallel in ("ddp", "fsdp"):
                raise UsageError(
                    f"--parallel {parallel} needs several processes: launch with torchrun --nproc-per-node N "
                    "-m mpaudit run ..., or give --nproc N."
                )
            return cls()
        if parallel == "none":
            raise UsageError("--parallel none cannot run under torchrun with more than one process.")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        else:
            backend = str(dist.get_backend())
        kind = "ddp" if parallel == "auto" else parallel
        return cls(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank, kind=kind,
                   backend=backend, timeout_s=timeout_s, _store=dist.distributed_c10d._get_default_store())

    def launcher_command(self) -> list[str]:
        """The torchrun options that reproduce this job's shape (for the report's reproduction line)."""
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        nodes = max(1, self.world_size // max(1, per_node))
        return ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc-per-node={per_node}"]

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` when the audit runs on CUDA."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as training calls it: DDP-wrapped, FSDP2-sharded in place, or as it is.

        Under FSDP see :func:`shard_fsdp` for the parameter groups."""
        if not self.active:
            return model
        if self.kind == "fsdp":
            return shard_fsdp(model)
        ids = [device.index] if device.type == "cuda" else None
        return _DDP(model, device_ids=ids)

    @property
    def scaler_cls(self) -> type[torch.amp.GradScaler]:
        """The GradScaler class for fp16 arms: under FSDP, the one that agrees across ranks on whether a step
        overflowed (each rank sees only its shard of the gradients)."""
        if self.active and self.kind == "fsdp":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler
        return torch.amp.GradScaler

    def shard(self, loader: Iterable[Any]) -> Iterable[Any]:
        """This rank's part of the training batches: a ``DistributedSampler`` for a map-style DataLoader,
        every ``world_size``-th batch otherwise (whole groups only, so every rank gets as many batches)."""
        if not self.active:
            return loader
        from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler

        if (
            isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and type(loader.batch_sampler) is BatchSampler
            and type(loader.sampler) in (RandomSampler, SequentialSampler)
            and loader.batch_size is not None
        ):
            sampler = _SeededDistributedSampler(
                loader.dataset,
                num_replicas=self.world_size, rank=self.rank,
                shuffle=isinstance(loader.sampler, RandomSampler), drop_last=True,
            )
            return DataLoader(
                loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                worker_init_fn=loader.worker_init_fn,
            )
        return _EveryKth(loader, self.world_size, self.rank)

    # ------------------------------------------------------------------ reductions

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (a sum all-reduce; gloo has no average)."""
        if not self.active:
            return value
        return self.all_reduce(value.detach().float().clone(), "sum") / self.world_size

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` reduced in place over ranks, ``op`` ``"sum"`` or ``"max"``; returns it."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` holds on every rank (so every rank takes the same branch)."""
        if not self.active:
            return flag
        failing = self.all_reduce(torch.tensor([0 if flag else 1], dtype=torch.int32, device=device), "max")
        return int(failing.item()) == 0

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ failure

    def failed(self, exc: BaseException, arm: str | None) -> RankFailed:
        """What a failure during a collective phase means for the job, as the exception to raise.

        If another rank already reported a failure (this rank's collective broke because that rank left),
        that failure is the cause. Otherwise this rank is where it started: its error goes to the store.
        """
        _FAILING.set()
        if isinstance(exc, RankFailed):
            return exc
        mine = "stopped by SIGTERM" if isinstance(exc, Terminated) else error_text(exc)
        wait = FAILURE_LOOKUP_S if _looks_like_peer_loss(exc) else 0.0
        other = self._reported_failure(wait)
        if other is not None:
            return other
        self._publish(mine, arm)
        return RankFailed(self.rank, mine, arm)

    def _publish(self, error: str, arm: str | None) -> None:
        if self._store is None:
            return
        with contextlib.suppress(Exception):  # the store may be gone with the job; the local error still stands
            self._store.set(f"{_FAILURE_KEY}{self.rank}", f"{arm or ''}\n{error}")

    def _reported_failure(self, wait_s: float) -> RankFailed | None:
        """The first failure another rank put in the store, waiting up to ``wait_s`` for one to appear."""
        if self._store is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            for r in range(self.world_size):
                if r == self.rank:
                    continue
                key = f"{_FAILURE_KEY}{r}"
                try:
                    if self._store.check([key]):
                        arm, _, error = self._store.get(key).decode().partition("\n")
                        return RankFailed(r, error, arm or None)
                except Exception:
                    return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def on_sigterm(self) -> None:
        """On rank 0 of a job: turn torchrun's SIGTERM into :class:`Terminated`, so rank 0 still writes what it
        has (torchrun waits 30 s before SIGKILL). Other ranks keep the default (they write nothing)."""
        if not (self.active and self.is_main):
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: finish writing, then exit
            if not _FAILING.is_set():  # (already on the failure path: let it finish writing)
                raise Terminated("SIGTERM")

        signal.signal(signal.SIGTERM, handler)

    def ignore_sigterm(self) -> None:
        """Once the audit is over, rank 0 finishes writing whatever comes (torchrun SIGKILLs after 30 s)."""
        if self.active and self.is_main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_after_failure(self, code: int) -> None:
        """A rank other than 0 leaves at once after a failure: its exit breaks the collectives its peers wait
        in, so none of them hangs. (Rank 0 returns normally, after writing the report.)"""
        if self.active and not self.is_main:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def close(self) -> None:
        """Tear the process group down at the end of a clean run."""
        if not self.active:
            return
        if dist.is_initialized():
            dist.barrier()  # no rank tears its connections down while a peer still has work in flight
            dist.destroy_process_group()


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that also answers for the wrapped model's attributes (``model.config``, ``model.vocab_size``), so a
    ``loss_fn`` written for the bare model runs unchanged. (The forward pass must still go through the
    wrapper, ``model(...)``, for DDP to synchronise gradients.)"""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(super().__getattr__("module"), name)


def shard_fsdp(model: nn.Module) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` in place. FSDP2 gathers one group's parameters at a time: every block of
    each ``nn.ModuleList`` (the usual way to hold a stack of layers, e.g. a transformer's blocks) is a group of
    its own, and the root holds the rest (embeddings, head)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block)
    fully_shard(model)
    return model


def _looks_like_peer_loss(exc: BaseException) -> bool:
    """A collective that broke because a peer left: gloo's closed connection, NCCL's errors, a timeout."""
    if isinstance(exc, (dist.DistError, Terminated)):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("connection closed", "connection reset", "timed out", "timeout", "gloo", "nccl"))


class _EveryKth:
    """Batch ``rank``, ``rank + k``, ... of a loader, in whole groups of ``k`` (a trailing partial group is
    dropped, so every rank sees as many batches)."""

    def __init__(self, loader: Iterable[Any], k: int, rank: int) -> None:
        self.loader, self.k, self.rank = loader, k, rank

    def __iter__(self) -> Iterator[Any]:
        group: list[Any] = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.k:
                yield group[self.rank]
                group = []

    def __len__(self) -> int:
        return len(self.loader) // self.k  # type: ignore[arg-type]


class _SeededDistributedSampler(DistributedSampler):
    """A DistributedSampler whose shuffle seed is drawn from torch's RNG each time it is iterated, as a
    RandomSampler's is, so the order follows the seed mpaudit sets before each epoch (the same on every rank)
    rather than a fixed seed plus ``set_epoch``."""

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        return super().__iter__()


def launch(nproc: int, argv: list[str]) -> int:
    """``mpaudit run --nproc N``: rerun the same command under ``torchrun --standalone --nproc-per-node N`` and
    return rank 0's exit code (so a gate failure is still 1 and a usage error 2)."""
    import subprocess
    import tempfile

    if nproc < 1:
        raise UsageError("--nproc must be at least 1.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--nproc launches torchrun itself; under torchrun, leave it out.")
    rest = _without_option(argv, "--nproc")
    with tempfile.TemporaryDirectory(prefix="mpaudit-launch-") as tmp:
        exit_file = os.path.join(tmp, "exit_code")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "mpaudit", *rest]
        proc = subprocess.run(cmd, env={**os.environ, EXIT_FILE_ENV: exit_file}, check=False)
        try:
            with open(exit_file) as f:
                return int(f.read().strip())
        except (OSError, ValueError):  # rank 0 died before it could say (killed, out of memory)
            return proc.returncode if proc.returncode in range(EXIT_RANK_FAILED + 1) else EXIT_INTERNAL


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


SINGLE = Parallel()
"""The single-process job."""

__all__ = ["DEFAULT_DIST_TIMEOUT_S", "EXIT_RANK_FAILED", "PARALLEL_KINDS", "SINGLE", "Parallel", "RankFailed"]
