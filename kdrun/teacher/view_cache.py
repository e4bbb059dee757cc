"""Exact teacher logits under augmentation: the frozen teacher's logits cached per (image, view).

Random crop after zero padding ``p`` and a horizontal flip give each training image ``(2p+1)^2 x 2`` possible
views (:func:`kdrun.data.dataset.num_views`), and training draws one view id per sample
(:func:`kdrun.data.dataset.draw_views`).
The teacher's logits are then a pure function of (image index, view id), so :class:`ViewCache` keeps them in a
dense ``[N, V, C]`` tensor with a filled mask ``[N, V]``, filled lazily: for each batch it looks the batch's
(index, view) pairs up and runs the teacher only on the misses. The student's inputs are exactly those of
the live path (same random numbers, same ops), and with ``teacher.cache_dtype=fp32`` the teacher's targets
are bit-identical to the live teacher's on CPU: a miss is computed in a batch of at least ``MIN_ROWS`` rows
(the whole batch when it is that small), where CPU kernels give each row the bits it gets in the full batch.
With ``fp16`` storage the targets are the live logits rounded to half precision (relative error <= 2^-11,
the same approximation as the train-split logit cache's fp16).

The cache lives in ``<store.teachers>/view-cache/<hash>.pt``, keyed by the teacher's weights, the data
identity (split, normalisation, fingerprint, augmentation), the view encoding, the precision and the storage
dtype, so it serves every epoch, ``T``, ``alpha``, seed, loss and job of a sweep; with the same seed a later
job draws the same views and never runs the teacher. On disk it holds the filled entries only (flat
positions ``n * V + v`` and their logits) with a checksum. It is read and written under a file lock;
a save merges the entries other jobs wrote meanwhile (theirs are kept where both have one), so parallel
jobs (joblib, SLURM) each add their own. A file that is unreadable (torn), for another key, of the wrong
shape, fails its checksum or holds non-finite logits is set aside (``*.bad-<time>``), never used. Saves
happen at the end of training and every ``SAVE_EVERY_S`` seconds (at an epoch's end) in between; at the start
of every epoch the teacher is recomputed on ``CHECK_SAMPLES`` entries read from the file, as the logit cache
does (a stale or misaligned cache stops the run).

In a data-parallel fit (``trainer.devices=N``, :mod:`kdrun.train.distributed`) every rank looks up the slice of the
batch it trains (:meth:`ViewCache.from_rank` on ranks 1..N-1, over rank 0's table and mask: shared memory on
CPU) and fills it with its own misses; epochs are closed on every rank together (their hits, misses and new
entries summed), and rank 0 alone checks against the file and saves.

Before anything is filled the dense size ``N * V * (C * bytes + 1)`` is estimated; above
``teacher.cache_budget_mb`` the teacher runs live, with the reason logged and put in the summary.

Consumes ``teacher.cache``, ``teacher.cache_dtype``, ``teacher.cache_budget_mb``, ``store.teachers``,
``trainer.precision``, ``dataset.augment.*``, ``seed``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from filelock import FileLock
from torch import nn

from kdrun.data.dataset import Batch, Data, finite_views
from kdrun.models.checkpoint import weights_hash
from kdrun.records import save_torch
from kdrun.store import read_only
from kdrun.teacher.logit_cache import DTYPES, MIXED, check_live, remove_partial_writes, set_aside
from kdrun.train.hooks import TeacherSource

log = logging.getLogger("kdrun")
FORMAT = 1          # bump when the file layout or the view encoding changes
MIN_ROWS = 16       # a teacher pass on misses covers at least this many rows of the batch (see the docstring)
SAVE_EVERY_S = 120  # between saves at epoch ends; the last epoch always saves
CHECK_SAMPLES = 16  # entries read from the file that are recomputed at the start of every epoch


def estimate_mb(n: int, views: int, classes: int, dtype: str) -> float:
    """Memory of the dense cache: logits ``[n, views, classes]`` in ``dtype`` plus a one-byte filled mask."""
    per_entry = classes * torch.tensor([], dtype=DTYPES[dtype]).element_size() + 1
    return n * views * per_entry / 2 ** 20


def plan(data: Data, dtype: str, budget_mb: float) -> tuple[bool, str, dict]:
    """Whether a view cache applies to ``data``'s augmentation and fits ``budget_mb``; why; its size."""
    aug = data.augment
    views = finite_views(aug)
    if aug.mixes:
        return False, MIXED, {}
    if views is None:
        return False, "augmentation is not a finite set of views: teacher run live on the student's batch", {}
    size = estimate_mb(len(data.train), views, data.num_classes, dtype)
    facts = {"views": views, "size_mb": round(size, 3), "budget_mb": budget_mb}
    what = f"{views} views per image (crop padding {aug.crop_padding}, flip {'on' if aug.hflip else 'off'})"
    if size > budget_mb:
        return False, (f"augmentation has {what}; a view cache of {len(data.train)} x {views} x {data.num_classes} "
                       f"{dtype} logits needs {size:.4g} MB > teacher.cache_budget_mb={budget_mb:g}: teacher run "
                       f"live on the student's batch"), facts
    return True, f"augmentation has {what}: teacher logits cached per (image, view), {size:.3g} MB", facts


def view_cache(teacher: nn.Module, data: Data, info: dict, *, dtype: str, precision: str, root: Path,
               budget_mb: float, seed: int, epochs: int) -> Optional["ViewCache"]:
    """A :class:`ViewCache` for ``teacher`` on ``data`` (loaded from the store), or None: run the teacher live.

    ``info`` is the run's teacher-cache record (:func:`kdrun.teacher.logit_cache.teacher_logits`'s, for
    ``teacher.cache=auto`` under augmentation): updated with the decision and, during training, the hits and
    misses of every epoch. ``epochs`` is the training's last epoch (the cache is saved when it ends)."""
    use, why, facts = plan(data, dtype, budget_mb)
    cache_dir = Path(root) / "view-cache"
    if use and read_only(cache_dir if cache_dir.is_dir() else Path(root)):
        use, why = False, f"store {root} is read-only (the view cache is written during training): teacher run live"
    info.update(kind="views", used=use, why=why, **facts)
    if not use:
        log.info(f"teacher view cache not used: {why}")
        return None
    key = json.dumps({"format": FORMAT, "teacher": weights_hash(teacher), "data": data.identity,
                      "augment": {"crop_padding": data.augment.crop_padding, "hflip": data.augment.hflip,
                                  "views": facts["views"]},
                      "precision": precision, "dtype": dtype}, sort_keys=True)
    path = Path(root) / "view-cache" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    cache = ViewCache(teacher, data, path, key, facts["views"], dtype=dtype, precision=precision, seed=seed,
                      epochs=epochs, info=info)
    info.update(path=str(path.resolve()), dtype=dtype)
    log.info(f"teacher view cache: {why}; {info['filled_at_start']} entries filled at start ({path})")
    return cache


class ViewCache(TeacherSource):
    """The teacher's logits per (train index, view id), filled lazily from the live ``teacher``.

    Looks up each batch by its indices and view ids (:class:`kdrun.data.dataset.Batch`); a batch without view ids
    (not augmented: it never happens in :func:`kdrun.train.loop.fit`) runs the teacher live."""

    def __init__(self, teacher: nn.Module, data: Data, path: Path, key: str, views: int, *, dtype: str,
                 precision: str, seed: int, epochs: int, info: dict):
        n, classes, device = len(data.train), data.num_classes, data.train.y.device
        self._start(teacher, data, path, key, views, dtype, precision, epochs, info, seed,
                    table=torch.zeros((n, views, classes), dtype=DTYPES[dtype], device=device),
                    filled=torch.zeros((n, views), dtype=torch.bool, device=device))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self.from_disk = self._merge_from_disk()
        info.update(filled_at_start=self.filled_count(), epochs=[], hits=0, misses=0)

    def _start(self, teacher: nn.Module, data: Data, path, key: str, views: int, dtype: str, precision: str,
               epochs: int, info: dict, seed: int, *, table: torch.Tensor, filled: torch.Tensor) -> None:
        """The state every cache starts from: nothing served, nothing read from the file yet."""
        self.model = teacher.eval().requires_grad_(False)
        self.data, self.path, self.key, self.views, self.dtype = data, Path(path), key, views, dtype
        self.precision, self.epochs, self.info = precision, epochs, info
        self.forward: Optional[nn.Module] = None
        self.memory_format = torch.contiguous_format
        self.shape, self.table, self.filled = tuple(table.shape), table, filled
        self.generator = torch.Generator().manual_seed(seed + 7919)
        self.epoch, self.hits, self.misses, self.served, self.added = 0, 0, 0, 0, 0
        self.last_save = time.monotonic()
        self.warned = False
        self.from_disk = torch.empty(0, dtype=torch.int64)  # positions read from the file at the start: checked
        self.rank = None  # this process's place in a data-parallel fit (set by prepare), else None

    def to_rank(self) -> tuple[tuple[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]:
        """The teacher and what :meth:`from_rank` needs besides the data; shared: the table and the filled mask."""
        args = {"path": str(self.path), "key": self.key, "views": self.views, "dtype": self.dtype,
                "precision": self.precision, "epochs": self.epochs}
        return (self.model, args), (self.table, self.filled)

    @classmethod
    def from_rank(cls, spec: tuple[nn.Module, dict], shared: tuple[torch.Tensor, torch.Tensor],
                  data: Data) -> "ViewCache":
        """Rank r > 0 of a data-parallel fit (:mod:`kdrun.train.distributed`): rank 0's table and filled mask (on
        CPU the same shared memory), looked up and filled with this rank's misses; rank 0 checks and saves."""
        (teacher, args), (table, filled) = spec, shared
        self = cls.__new__(cls)
        self._start(teacher, data, args["path"], args["key"], args["views"], args["dtype"], args["precision"],
                    args["epochs"], {"epochs": [], "hits": 0, "misses": 0}, 0, table=table, filled=filled)
        return self  # from_disk stays empty: nothing to check here, rank 0 does

    # -- TeacherSource ---------------------------------------------------------------------------------------

    def prepare(self, needs_teacher: bool, memory_format: torch.memory_format, compile: bool) -> None:
        from kdrun.train import distributed
        from kdrun.train.infer import model_format

        self.rank = distributed.current()
        if needs_teacher:
            self.memory_format = model_format(self.model, memory_format)
            self.model.to(memory_format=self.memory_format)
            self.forward = torch.compile(self.model) if compile else self.model

    def before_epoch(self, epoch: int, model: nn.Module) -> bool:
        if self.epoch:  # the previous epoch did not close itself (it served fewer rows than the train split)
            self._end_epoch()
        self.epoch = epoch
        self.check(epoch)
        return True

    @torch.no_grad()
    def logits(self, batch: Batch) -> Optional[torch.Tensor]:
        if self.forward is None:
            return None
        x, idx = batch.x, batch.idx
        if batch.views is None:
            if not self.warned:
                log.warning("teacher view cache: a batch came without its view ids; the teacher runs live on it")
                self.warned = True
            return self.forward(x)
        views = batch.views.to(idx.device)
        out = self.table[idx, views]
        hit = self.filled[idx, views]
        miss = torch.nonzero(~hit).flatten() if not bool(hit.all()) else None
        if miss is not None:
            fresh = self._teacher_rows(x, miss).to(self.table.dtype)
            out[miss] = fresh
            good = torch.isfinite(fresh).all(dim=1)  # a non-finite row is served (the loss then reports it), not kept
            rows, cols = idx[miss][good], views[miss][good]
            self.table[rows, cols] = fresh[good]
            self.filled[rows, cols] = True
            self.added += int(good.sum())
        misses = 0 if miss is None else len(miss)
        self.misses += misses
        self.hits += len(idx) - misses
        self.served += len(idx)
        if self.served >= len(self.data.train) and self.rank is None:  # data-parallel: closed on every rank at once
            self._end_epoch()
        return out

    def after_fit(self) -> None:
        if self.epoch:  # the last epoch of a data-parallel fit (one process closes it as it serves its last row)
            self._end_epoch()
        self.rank = None

    # -- filling, checking, saving ---------------------------------------------------------------------------

    def _teacher_rows(self, x: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (float32) on rows ``miss`` of ``x``, computed as in a batch of >= MIN_ROWS rows."""
        n = len(x)
        if len(miss) == n or n <= MIN_ROWS:
            return self.forward(x).float()[miss]
        rows = miss
        if len(miss) < MIN_ROWS:  # pad with hit rows: tiny batches take other kernel paths (other rounding)
            hit = torch.ones(n, dtype=torch.bool, device=x.device)
            hit[miss] = False
            rows = torch.cat([miss, torch.nonzero(hit).flatten()[:MIN_ROWS - len(miss)]])
        return self.forward(x[rows].contiguous(memory_format=self.memory_format)).float()[:len(miss)]

    def filled_count(self) -> int:
        return int(self.filled.sum())

    def _end_epoch(self) -> None:
        if self.rank is not None:  # every rank's hits, misses and new entries: rank 0 reports and saves them
            counts = self.rank.sum(torch.tensor([self.hits, self.misses, self.added], dtype=torch.float64,
                                                device=self.filled.device))
            self.hits, self.misses, added = (int(v) for v in counts.tolist())
            self.added = added if self.rank.main else 0
            if not self.rank.main:
                self.epoch, self.hits, self.misses, self.served = 0, 0, 0, 0
                return
        record = {"epoch": self.epoch, "hits": self.hits, "misses": self.misses}
        self.info["epochs"].append(record)
        self.info["hits"] += self.hits
        self.info["misses"] += self.misses
        log.info(f"teacher view cache epoch {self.epoch}: {self.hits} hits, {self.misses} misses (teacher run on "
                 f"{self.misses} images), {self.filled_count()} of {self.filled.numel()} entries filled")
        final = self.epoch >= self.epochs
        self.epoch, self.hits, self.misses, self.served = 0, 0, 0, 0
        if final or time.monotonic() - self.last_save >= SAVE_EVERY_S:
            self.save()

    @torch.no_grad()
    def check(self, epoch: int) -> float:
        """Recompute the teacher on ``CHECK_SAMPLES`` random entries read from the file (those filled by this run
        come from the live teacher already); stop the run when they disagree."""
        flat = self.from_disk
        if not len(flat):
            return 0.0
        pick = flat[torch.randint(len(flat), (min(CHECK_SAMPLES, len(flat)),), generator=self.generator)]
        pick = pick.to(self.filled.device)
        idx, views = pick.div(self.views, rounding_mode="floor"), pick.remainder(self.views)
        return check_live(self.model, lambda: self.data.inputs("train", idx, views=views), self.table[idx, views],
                          device=self.data.train.y.device, precision=self.precision, dtype=self.dtype, epoch=epoch,
                          what="teacher view cache", sampled=f"{len(pick)} sampled views", path=self.path,
                          again="refills")

    def save(self) -> None:
        """Write the filled entries, merged with those other jobs saved meanwhile, under the file's lock."""
        if not self.added:
            return
        with self._lock():
            self._merge_from_disk()
            flat = torch.nonzero(self.filled.flatten()).flatten()
            values = self.table.flatten(0, 1)[flat].cpu()
            index = flat.cpu()
            save_torch(self.path, {"format": FORMAT, "key": self.key, "shape": list(self.shape), "index": index,
                                   "logits": values, "checksum": _checksum(index, values)})
        self.added, self.last_save = 0, time.monotonic()
        log.info(f"teacher view cache saved: {len(index)} entries ({self.path})")

    def _lock(self) -> FileLock:
        return FileLock(str(self.path.with_suffix(".lock")))

    def _merge_from_disk(self) -> torch.Tensor:
        """Copy the file's entries into memory (theirs win where both have one); return their positions. Call
        under the lock."""
        remove_partial_writes(self.path)
        if not self.path.exists():
            return torch.empty(0, dtype=torch.int64)
        loaded, problem = _load(self.path, self.key, self.shape)
        if problem:
            set_aside(self.path, problem, "teacher view cache", "not used")
            self.added = max(self.added, 1)  # what this job has must be written again
            return torch.empty(0, dtype=torch.int64)
        index, values = loaded
        device = self.filled.device
        self.table.flatten(0, 1)[index.to(device)] = values.to(device, self.table.dtype)
        self.filled.flatten()[index.to(device)] = True
        return index


def _checksum(index: torch.Tensor, values: torch.Tensor) -> str:
    digest = hashlib.sha256(index.contiguous().numpy().tobytes())
    digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _load(path: Path, key: str, shape: tuple) -> tuple[Optional[tuple], Optional[str]]:
    """``(index, logits)`` of a cache file, or ``(None, reason)`` when it must not be used."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        index, values, stored_key, checksum = obj["index"], obj["logits"], obj["key"], obj["checksum"]
        stored_shape = tuple(obj["shape"])
    except Exception as exc:  # noqa: BLE001 - torn, truncated or foreign files are all rejected the same way
        return None, f"unreadable: {type(exc).__name__}"
    if stored_key != key:
        return None, "its key does not match this teacher, data and augmentation"
    if stored_shape != tuple(shape) or values.dim() != 2 or values.shape != (len(index), shape[2]):
        return None, f"shape {stored_shape} / {tuple(values.shape)} does not match {tuple(shape)}"
    if index.dtype != torch.int64 or (len(index) and (index.min() < 0 or index.max() >= shape[0] * shape[1])):
        return None, "entry positions out of range"
    if _checksum(index, values) != checksum:
        return None, "checksum mismatch: the file was modified"
    if not bool(torch.isfinite(values).all()):
        return None, "it holds non-finite logits"
    return (index, values), None
