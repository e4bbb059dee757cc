"""``trainer.devices=N``: one training on N devices, data-parallel (``DistributedDataParallel``), spawned in-task.

:func:`kdrun.train.loop.fit` with ``recipe.devices > 1`` enters :func:`ranks`, handing it itself: the calling process
becomes rank 0 and N - 1 worker processes are spawned (``torch.multiprocessing``, start method ``spawn``) that run
that ``fit`` on copies of the model and the loss, and on the teacher source as it says it crosses to another rank
(:meth:`kdrun.train.hooks.TeacherSource.to_rank` / ``from_rank``: this module knows no source by name). The data
tensors and the tensors a source shares (the teacher's cached logits, read-only; the view cache's table, which
every rank fills with its own misses) are shared with them (shared memory; on GPUs each rank copies them to its
own device once). The ranks live inside the task, so ``kdrun -m``
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
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from kdrun.data.dataset import Batch
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

    def shard(self, batch: Batch) -> tuple[Batch, float, int]:
        """This rank's slice of a batch (every per-sample field, view ids included): ``(batch, weight, count)``.

        The batch of B samples is cut into k = min(N, max(1, B // 2)) contiguous slices as equal as possible
        (none of one sample unless the batch has one: BatchNorm needs two). Loss scaling: DDP averages the
        gradients over the N ranks, so rank r's loss, a mean over its n_r samples, is multiplied by
        ``weight`` = N·n_r/B; the average is then Σ_r (n_r/B)·∇L_r, the gradient of the single-process batch mean,
        also for an uneven last batch (with equal slices the weight is 1). A rank past the k-th (only in a batch
        smaller than 2N) still has to take part in the step: it runs the whole batch with weight 0 and counts
        no samples (``count``, for the epoch's mean losses).
        """
        b = len(batch.y)
        k = min(self.world, max(1, b // 2))
        if self.rank >= k:
            return batch, 0.0, 0
        q, r = divmod(b, k)
        lo, n = self.rank * q + min(self.rank, r), q + (self.rank < r)
        return batch.rows(lo, lo + n), self.world * n / b, n

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
def ranks(fit: Callable, model: nn.Module, data, recipe, loss_fn: nn.Module, teacher, desc: str,
          checkpoint) -> Iterator[Rank]:
    """Spawn ranks 1..N-1 (``N = recipe.devices``) running ``fit`` (:func:`kdrun.train.loop.fit`, a module-level
    function: sent by reference) on copies of ``model``; inside, this process is rank 0.

    On leaving, the workers are joined (a worker's error is raised with its traceback); on an error or a stop
    here, they are ended. Raises :class:`ConfigError` (``trainer.devices``) when the run cannot be spread.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    world, device = recipe.devices, data.train.y.device
    _check(world, device)
    spec, shared = _spec(fit, model, recipe, loss_fn, teacher, desc, checkpoint)
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


def _spec(fit: Callable, model, recipe, loss_fn, teacher, desc, checkpoint) -> tuple[bytes, tuple]:
    """What a worker rebuilds its fit from, pickled (copies: each rank updates its own weights), and the
    tensors shared with it (the teacher source's: :meth:`kdrun.train.hooks.TeacherSource.to_rank`)."""
    source, shared = None, ()
    if teacher is not None:
        spec, shared = teacher.to_rank()
        source = (type(teacher), spec)  # the class by reference: its from_rank rebuilds the source there
    if "formula" in vars(loss_fn):  # a user loss's generated formula (a lambda): not needed to train
        loss_fn = copy.copy(loss_fn)
        del loss_fn.formula
    buffer = io.BytesIO()
    try:
        torch.save({"fit": fit, "model": model, "loss": loss_fn, "teacher": source, "recipe": recipe, "desc": desc,
                    "checkpoint": checkpoint}, buffer)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError("trainer.devices", f"the model, loss or teacher cannot be sent to the other ranks "
                                             f"({exc}); use trainer.devices=1") from None
    return buffer.getvalue(), shared


def _worker(index: int, world: int, port: int, spec: bytes, data, shared: tuple, threads: int, device: str,
            parent: int) -> None:
    """Rank ``index + 1``: rebuild the fit from ``spec`` on this rank's device, train, return nothing."""
    import torch.distributed as dist

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
    teacher = None
    if state["teacher"] is not None:
        cls, source = state["teacher"]
        teacher = cls.from_rank(source, tuple(t.to(dev) for t in shared), data)
    store.set(f"ready/{rank}", "1")
    _init(rank, world, store, dev)
    try:
        state["fit"](state["model"].to(dev), data, state["recipe"], state["loss"].to(dev), teacher=teacher,
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
