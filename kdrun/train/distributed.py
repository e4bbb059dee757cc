"""``trainer.devices=N``: one training on N devices, data-parallel (``DistributedDataParallel``), spawned in-task.

:func:`kdrun.train.loop.fit` with ``recipe.devices > 1`` enters :func:`ranks`: the calling process becomes rank 0
and N - 1 worker processes are spawned (``torch.multiprocessing``, start method ``spawn``) that run the same
``fit`` on copies of the model, the loss and the teacher source; the data tensors and the teacher's cached
logits are shared with them read-only (shared memory; on GPUs each rank copies them to its own device once),
cached logits indexed by each rank's own sample indices. The view cache (:mod:`kdrun.teacher.view_cache`) is one table in
shared memory on CPU that every rank looks its slice up in and fills with its own misses; rank 0 saves it (on
GPUs each rank fills its own copy and rank 0 saves its own entries). The ranks live inside the task, so ``kdrun -m``
sweeps and the SLURM launcher work unchanged (never ``torchrun`` with ``-m``).

Rank 0 is the calling process: hooks (``metrics.jsonl``, the log), the progress bar, validation, best-epoch
selection, resume checkpoints and the returned ``FitResult`` are those of the single-device loop, written once.
The other ranks only train (a resumed run: they read the same checkpoint). They ignore SIGINT / SIGTERM: rank 0
stops at its safe point and ends them.

Data order: every rank draws the seeded permutation and augmentation of the single-process run and takes its
contiguous slice of each batch (:meth:`Rank.shard`), so the global batch and the data order are those of
``trainer.devices=1``. The frozen teacher is not wrapped: each rank runs it on its own slice.

Not bit-exact against one device: BatchNorm's batch statistics are per slice (its running statistics are rank
0's, which DDP broadcasts before every forward), dropout draws its masks per rank, and float sums are reduced
in another order. A model without BatchNorm or dropout (e.g. ``student=mlp``) agrees to float rounding.

Backend: nccl on CUDA, one GPU per rank (rank r on ``cuda:i+r`` when the run's device is ``cuda:i``); gloo on
CPU. Rendezvous: a ``TCPStore`` on 127.0.0.1 bound to port 0 (the OS picks a free port), so parallel jobs on
one node never collide.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
from torch import nn

from kdrun.errors import ConfigError

TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a slow rank (rank 0 validating, checkpointing)
_CURRENT: Optional["Rank"] = None  # this process's rank while a data-parallel fit runs


@dataclass
class Rank:
    """This process's place in a data-parallel :func:`kdrun.train.loop.fit`."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the calling process, which validates, logs and writes."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (gradients averaged over the ranks in backward)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """This rank's slice of a batch: ``(x, y, idx, weight, count)``.

        The batch of B samples is cut into k = min(N, max(1, B // 2)) contiguous slices as equal as possible
        (none of one sample unless the batch has one: BatchNorm needs two). Loss scaling: DDP averages the
        gradients over the N ranks, so rank r's loss, a mean over its n_r samples, is multiplied by
        ``weight`` = N·n_r/B; the average is then Σ_r (n_r/B)·∇L_r, the gradient of the single-process batch mean,
        also for an uneven last batch (with equal slices the weight is 1). A rank past the k-th (only in a batch
        smaller than 2N) still has to take part in the step: it runs the whole batch with weight 0 and counts
        no samples (``count``, for the epoch's mean losses).
        """
        b = len(y)
        bounds = self._bounds(b)
        if bounds is None:
            return x, y, idx, 0.0, 0
        lo, n = bounds
        return x[lo:lo + n], y[lo:lo + n], idx[lo:lo + n], self.world * n / b, n

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a per-sample tensor of the batch (its view ids), cut as :meth:`shard` cuts."""
        bounds = self._bounds(len(t))
        return t if bounds is None else t[bounds[0]:bounds[0] + bounds[1]]

    def _bounds(self, b: int) -> Optional[tuple[int, int]]:
        """``(first row, rows)`` of this rank's slice of a batch of ``b``; None: the whole batch, weight 0."""
        k = min(self.world, max(1, b // 2))
        if self.rank >= k:
            return None
        q, r = divmod(b, k)
        return self.rank * q + min(self.rank, r), q + (self.rank < r)

    def sync_grads(self, params) -> None:
        """Average the gradients of ``params`` that DDP does not own (a feature loss's adapters) over the ranks."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (the epoch's loss sums)."""
        import torch.distributed as dist

        dist.all_reduce(t)
        return t


def current() -> Optional[Rank]:
    """This process's :class:`Rank` inside a data-parallel fit; None otherwise (the single-device path)."""
    return _CURRENT


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the run's CPU, or the ``rank``-th GPU from the run's own."""
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


@contextlib.contextmanager
def ranks(model: nn.Module, data, recipe, loss_fn: nn.Module, teacher, desc: str, checkpoint) -> Iterator[Rank]:
    """Spawn ranks 1..N-1 (``N = recipe.devices``) training copies of ``model``; inside, this process is rank 0.

    On leaving, the workers are joined (a worker's error is raised with its traceback); on an error or a stop
    here, they are ended. Raises :class:`ConfigError` (``trainer.devices``) when the run cannot be spread.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    world, device = recipe.devices, data.train.y.device
    _check(world, device)
    spec, shared = _spec(model, recipe, loss_fn, teacher, desc, checkpoint)
    if device.type == "cuda":  # sent through host memory: CUDA IPC would open a context on this GPU in every rank
        data, shared = _on(data, torch.device("cpu")), tuple(t.cpu() for t in shared)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    try:
        workers = mp.start_processes(_worker, args=(world, store.port, spec, data, shared, torch.get_num_threads(),
                                                    str(device), os.getpid()),
                                     nprocs=world - 1, join=False, start_method="spawn")
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError("trainer.devices", f"the data cannot be sent to the other ranks ({exc}); "
                                             f"use trainer.devices=1") from None
    try:
        _wait_ready(store, workers, world)
        rank = _init(0, world, store, device)
        yield rank
        _leave()
        while not workers.join(grace_period=0):
            pass
    except BaseException as exc:
        failed = _worker_error(workers, exc)
        _end(workers)
        if failed is not None:
            raise failed from exc
        raise
    finally:
        _teardown()
        for path in workers.error_files:  # a failed worker's traceback, read by now
            with contextlib.suppress(OSError):
                os.unlink(path)


def _check(world: int, device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("trainer.devices", "this torch build has no torch.distributed; use trainer.devices=1")
    if dist.is_initialized():
        raise ConfigError("trainer.devices", "a process group exists already (torchrun?); kdrun spawns its own "
                                             "ranks: start it as one process")
    if device.type == "cuda" and (device.index or 0) + world > torch.cuda.device_count():
        raise ConfigError("trainer.devices", f"{world} ranks from {device} need {(device.index or 0) + world} GPUs, "
                                             f"found {torch.cuda.device_count()}")


def _spec(model, recipe, loss_fn, teacher, desc, checkpoint) -> tuple[bytes, tuple]:
    """What a worker rebuilds its fit from, pickled (copies: each rank updates its own weights), and the
    tensors shared with it: the teacher's cached logits (read-only), or the view cache's table and filled mask
    (on CPU one shared copy that every rank fills with its misses)."""
    from kdrun.teacher.sources import CachedLogits, LiveTeacher, SnapshotTeacher
    from kdrun.teacher.view_cache import ViewCache

    shared = ()
    if teacher is None:
        source = None
    elif type(teacher) is CachedLogits:  # rank 0 alone runs the per-epoch check against the live teacher
        source, shared = ("cached",), (teacher.cached,)
    elif type(teacher) is ViewCache:  # rank 0 alone checks against the file and saves it
        source, shared = ("views", teacher.model, teacher.worker_args()), (teacher.table, teacher.filled)
    elif type(teacher) is LiveTeacher:
        source = ("live", teacher.model)
    elif type(teacher) is SnapshotTeacher:  # rank 0 alone records the snapshot (on_snapshot)
        source = ("snapshot", teacher.at, teacher.model)
    else:
        source = ("object", teacher)
    if "formula" in vars(loss_fn):  # a user loss's generated formula (a lambda): not needed to train
        loss_fn = copy.copy(loss_fn)
        del loss_fn.formula
    buffer = io.BytesIO()
    try:
        torch.save({"model": model, "loss": loss_fn, "teacher": source, "recipe": recipe, "desc": desc,
                    "checkpoint": checkpoint}, buffer)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError("trainer.devices", f"the model, loss or teacher cannot be sent to the other ranks "
                                             f"({exc}); use trainer.devices=1") from None
    return buffer.getvalue(), shared


def _worker(index: int, world: int, port: int, spec: bytes, data, shared: tuple, threads: int, device: str,
            parent: int) -> None:
    """Rank ``index + 1``: rebuild the fit from ``spec`` on this rank's device, train, return nothing."""
    import torch.distributed as dist

    from kdrun.train.loop import fit

    rank = index + 1
    # Ctrl-C reaches every process of the terminal and SLURM signals every task: rank 0 decides when to stop.
    # (SIGINT also arrives when the parent dies, through spawn's parent-death signal: then leave.)
    signal.signal(signal.SIGINT, lambda *_: os._exit(1) if os.getppid() != parent else None)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    dev = rank_device(torch.device(device), rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=TIMEOUT)
    state = torch.load(io.BytesIO(spec), map_location=dev, weights_only=False)
    data = _on(data, dev)
    teacher = _source(state["teacher"], shared, dev, data)
    store.set(f"ready/{rank}", "1")
    _init(rank, world, store, dev)
    try:
        fit(state["model"].to(dev), data, state["recipe"], state["loss"].to(dev), teacher=teacher,
            desc=state["desc"], checkpoint=state["checkpoint"])
    except BaseException:
        _teardown()
        raise
    _leave()
    # Skip the interpreter's shutdown: destructors of gloo's and the store's threads running then can abort the
    # process ("terminate called without an active exception") after a run that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _no_check(epoch: int) -> float:
    return 0.0


def _source(spec, shared: tuple, device: torch.device, data):
    from kdrun.teacher.sources import CachedLogits, LiveTeacher, SnapshotTeacher
    from kdrun.teacher.view_cache import ViewCache

    if spec is None:
        return None
    if spec[0] == "cached":
        return CachedLogits(shared[0].to(device), _no_check)
    if spec[0] == "views":
        return ViewCache.for_rank(spec[1], data, *(t.to(device) for t in shared), **spec[2])
    if spec[0] == "live":
        return LiveTeacher(spec[1])
    if spec[0] == "snapshot":
        source = SnapshotTeacher(spec[1])
        source.model = spec[2]
        return source
    return spec[1]


def _on(data, device: torch.device):
    """``data`` on this rank's device (the same tensors on CPU)."""
    import dataclasses

    from kdrun.data.dataset import Split

    if data.train.y.device == device:
        return data
    on = lambda s: Split(s.x if not isinstance(s.x, torch.Tensor) else s.x.to(device), s.y.to(device))
    return dataclasses.replace(data, train=on(data.train), val=on(data.val), test=on(data.test),
                               mean=data.mean.to(device), std=data.std.to(device))


def _init(rank: int, world: int, store, device: torch.device) -> Rank:
    import torch.distributed as dist

    global _CURRENT
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    _CURRENT = Rank(rank, world, device)
    return _CURRENT


def _teardown() -> None:
    import torch.distributed as dist

    global _CURRENT
    _CURRENT = None
    if dist.is_initialized():
        dist.destroy_process_group()


def _leave() -> None:
    """A finished fit's orderly end, on every rank: wait for all (no rank tears down while another still
    talks to it), then leave the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    _teardown()


def _wait_ready(store, workers, world: int) -> None:
    """Wait until every worker has loaded its copy; a worker that fails meanwhile raises its error here."""
    keys = [f"ready/{r}" for r in range(1, world)]
    while not store.check(keys):
        if workers.join(timeout=0.05, grace_period=0):  # raises if a worker died
            raise RuntimeError("the spawned ranks exited before training started")


def _worker_error(workers, exc: BaseException) -> Optional[BaseException]:
    """When rank 0 failed in a collective (a RuntimeError) because a worker died, that worker's error."""
    from torch.multiprocessing.spawn import ProcessException

    if not isinstance(exc, RuntimeError) or isinstance(exc, ProcessException):
        return None
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if workers.join(timeout=0.1, grace_period=0):
                return None
        except ProcessException as failed:
            return failed
    return None


def _end(workers) -> None:
    """Kill the workers still running (they ignore SIGTERM) and reap them."""
    for process in workers.processes:
        if process.is_alive():
            process.kill()
        process.join()
