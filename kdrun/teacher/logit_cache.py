"""Exact teacher-logit cache: the frozen teacher's logits on the whole train split, computed once.

When the teacher sees each training image the same way every epoch (no random augmentation), its logits
are a pure function of the sample, so they can be computed once and reused by every student, T and alpha
of a sweep (T and alpha are applied at loss time). A cache file is keyed by a hash of the teacher's
weights, the dataset identity (split, normalisation, fingerprint), the precision and the storage dtype, and
carries a checksum of its logits. It is guarded three ways:

* on load: key, shape and checksum must match, the logits be finite, and the teacher recomputed on
  ``VERIFY_ROWS`` randomly drawn rows agree with them (:func:`verify_sample`: the checksum catches accidents, not
  an edit that recomputed it), else the file is set aside and rebuilt (never trusted); a read-only store's
  cache is used as it is, or the logits computed for the run and not saved;
* on build: non-finite logits are never written; the run stops and the teacher's store entry, which
  produced them, is set aside (:func:`kdrun.store.set_aside`) so the next run trains it again;
* every epoch: the teacher is recomputed on a random sample of cached indices and must agree within
  tolerance, else the run stops (a stale or misaligned cache must not silently teach wrong targets);
* ``teacher.cache=auto`` uses the cache only when augmentation is off; with random augmentation the
  teacher's logits are cached per (image, view) instead (:mod:`kdrun.teacher.view_cache`), or run live on the very
  batch the student sees when that cache does not apply (``teacher.cache=on`` forces this cache anyway). Under
  mixup / CutMix no cache applies: every batch is a fresh mix, which the teacher sees live (``on`` is refused).

Consumes ``teacher.cache``, ``teacher.cache_dtype``, ``store.teachers``, ``trainer.precision``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from filelock import FileLock
from torch import nn

from kdrun.data.dataset import Data
from kdrun.errors import KdrunError
from kdrun.models.checkpoint import weights_hash
from kdrun.records import save_torch
from kdrun.store import read_only
from kdrun.train.infer import autocast, predict

log = logging.getLogger("kdrun")
CHECK_SAMPLES = 64  # rows recomputed every epoch
VERIFY_ROWS = 920   # rows recomputed at load: a 0.5 % corruption is caught with probability >= 99 % (verify_sample)
TOLERANCE = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 1e-2)}  # (atol, rtol) of the per-epoch check
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MIXED = ("mixup/CutMix (dataset.augment) mix every batch afresh: the teacher runs live on the student's mixed batch "
         "(consistent teaching)")


def _checksum(logits: torch.Tensor) -> str:
    return hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()[:16]


def decide(mode: str, data: Data) -> tuple[bool, str]:
    """Whether to use the cache under ``teacher.cache=mode``, and why."""
    random_aug = data.augment.crop_padding > 0 or data.augment.hflip
    if mode == "off":
        return False, "teacher.cache=off: teacher run live on every batch"
    if data.augment.mixes:  # teacher.cache=on is refused with mixing (kdrun.schema.Config)
        return False, MIXED
    if mode == "on":
        why = "teacher.cache=on"
        return True, why + (" (augmentation is random: the teacher sees un-augmented images)" if random_aug else "")
    if random_aug:
        return False, "augmentation is random: teacher logits per (image, view) or live on the student's batch"
    return True, "no random augmentation: the teacher's logits are a pure function of the sample"


def teacher_logits(teacher: nn.Module, data: Data, *, mode: str, dtype: str, precision: str, root: Path,
                   batch_size: int, teacher_entry: Optional[Path] = None,
                   channels_last: str = "auto") -> tuple[Optional[torch.Tensor], dict]:
    """Cached train-split logits of ``teacher`` (built on a miss), or None when the cache is not used.

    ``teacher_entry`` is the teacher's store entry (None for ``teacher.ckpt`` or merged teachers): it is set
    aside when the teacher's logits are not finite."""
    use, why = decide(mode, data)
    info = {"mode": mode, "kind": "train", "used": use, "why": why}
    if not use:
        return None, info
    key = json.dumps({"teacher": weights_hash(teacher), "data": data.identity, "precision": precision,
                      "dtype": dtype}, sort_keys=True)
    path = Path(root) / "logit-cache" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def load() -> tuple[Optional[torch.Tensor], Optional[str]]:
        logits, problem = _load(path, key, len(data.train), data.num_classes) if path.exists() else (None, None)
        if logits is not None:
            problem = verify_sample(teacher, data, logits, dtype=dtype, precision=precision, batch_size=batch_size)
        return (None, problem) if problem else (logits, None)

    def build() -> torch.Tensor:
        logits = predict(teacher, data, "train", batch_size, precision, channels_last).cpu().to(DTYPES[dtype])
        if not bool(torch.isfinite(logits).all()):
            _refuse_non_finite(logits, path, teacher_entry)
        return logits

    start = time.perf_counter()
    if read_only(path.parent if path.parent.is_dir() else Path(root)):  # a shared store: use it as it is
        logits, problem = load()
        built = logits is None
        if built:
            logits = build()
            log.warning(f"teacher logit cache: store {root} is read-only and holds no usable cache "
                        f"({problem or 'none stored'}); computed for this run, not saved")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock"))):
            logits, problem = load()
            if problem:
                set_aside(path, problem, "teacher logit cache", "rebuilding")
            remove_partial_writes(path)
            built = logits is None
            if built:
                logits = build()
                save_torch(path, {"logits": logits, "key": key, "checksum": _checksum(logits)})
    seconds = time.perf_counter() - start
    info.update(path=str(path.resolve()), built=built, build_s=round(seconds, 3) if built else 0.0,
                verify_s=None if built else round(seconds, 3), dtype=dtype)
    log.info(f"teacher logit cache: {'built in %.2fs' % seconds if built else 'reused (verified in %.2fs)' % seconds} "
             f"({why}) {path}")
    return logits.to(data.train.y.device), info


def verify_sample(teacher: nn.Module, data: Data, logits: torch.Tensor, *, dtype: str, precision: str,
                  batch_size: int) -> Optional[str]:
    """Recompute the teacher on ``VERIFY_ROWS`` rows of the cached ``logits`` drawn unpredictably (not from the
    run's seed) and compare within ``dtype``'s tolerance; None when they agree, else what is wrong.

    When at least 0.5 % of the rows are wrong, all ``VERIFY_ROWS`` = 920 drawn rows are right with probability
    at most (1 - 0.005)^920 < 1 %: such an edit is caught at load 99 times in 100 (the checksum cannot catch an
    edit whose checksum was recomputed). An edit of a few rows of a large cache can pass; the per-epoch check
    (:func:`make_check`) then samples more."""
    n = len(logits)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    idx = torch.randperm(n, generator=generator)[:VERIFY_ROWS].sort().values.to(data.train.y.device)
    bad, worst = 0, 0.0
    for part in idx.split(batch_size):
        wrong, err = disagreement(teacher, data.inputs("train", part), logits[part.cpu()].to(part.device),
                                  device=data.train.y.device, precision=precision, dtype=dtype)
        bad, worst = bad + int(wrong.sum()), max(worst, err)
    if bad:
        return (f"{bad} of {len(idx)} rows checked against the teacher differ (max |diff| {worst:.3g}): its logits "
                f"were modified")
    return None


def _refuse_non_finite(logits: torch.Tensor, path: Path, teacher_entry: Optional[Path]) -> None:
    """Stop the run: a teacher whose logits hold NaN or inf must not teach, and its cache is not written."""
    bad = int((~torch.isfinite(logits)).any(dim=1).sum())
    what = f"the teacher's logits are not finite on {bad} of {len(logits)} training images"
    if teacher_entry is None:
        raise KdrunError(f"{what}: its weights (teacher.ckpt) are broken; no logit cache written ({path})")
    from kdrun.store import set_aside

    aside = set_aside(Path(teacher_entry), "its logits are not finite")
    where = f"moved to {aside}" if aside else "already moved aside by another job"
    raise KdrunError(f"{what}: its store entry {teacher_entry} is corrupt and was set aside ({where}); no logit "
                     f"cache written. The next run trains the teacher again (should it diverge again, check its "
                     f"recipe: teacher.optim, trainer.precision)")


def set_aside(path: Path, problem: str, what: str, then: str) -> Path:
    """Move the rejected cache file ``path`` (``what``, rejected for ``problem``) to ``*.bad-<time>``, never to be
    used, and say so with what happens ``then``; return where it went. Call under its lock."""
    aside = path.with_name(path.name + f".bad-{int(time.time())}")
    os.replace(path, aside)
    log.warning(f"{what} {path} rejected ({problem}); moved to {aside.name}, {then}")
    return aside


def remove_partial_writes(path: Path) -> None:
    """Remove temp files of ``path`` left by a process killed while writing it (call under its lock)."""
    for tmp in path.parent.glob(f".{path.name}.*"):
        tmp.unlink(missing_ok=True)
        log.warning(f"removed {tmp}: a partial write of a teacher cache by a killed process")


def _load(path: Path, key: str, n: int, num_classes: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The cached logits, or (None, reason) when the file is unreadable, for another key, or tampered."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        logits, stored_key, checksum = obj["logits"], obj["key"], obj["checksum"]
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files are all rejected the same way
        return None, f"unreadable: {type(exc).__name__}"
    if stored_key != key:
        return None, "its key does not match this teacher and data"
    if tuple(logits.shape) != (n, num_classes):
        return None, f"shape {tuple(logits.shape)} != {(n, num_classes)}"
    if _checksum(logits) != checksum:
        return None, "checksum mismatch: the file was modified"
    if not bool(torch.isfinite(logits).all()):
        return None, "it holds non-finite logits"
    return logits, None


def make_check(teacher: nn.Module, data: Data, cached: torch.Tensor, *, dtype: str, precision: str,
               seed: int, path: Optional[Path] = None) -> Callable[[int], float]:
    """A per-epoch guard: recompute the teacher on ``CHECK_SAMPLES`` random cached indices and compare.

    ``path`` is the cache file (``teacher_logits``'s ``info["path"]``), named in the error."""
    generator = torch.Generator().manual_seed(seed + 7919)

    def check(epoch: int) -> float:
        idx = torch.randperm(len(data.train), generator=generator)[:CHECK_SAMPLES].to(cached.device)
        return check_live(teacher, lambda: data.inputs("train", idx), cached[idx], device=data.train.y.device,
                          precision=precision, dtype=dtype, epoch=epoch, what="teacher logit cache",
                          sampled=f"{CHECK_SAMPLES} sampled images", path=path or "the cache file", again="rebuilds")
    return check


@torch.no_grad()
def disagreement(teacher: nn.Module, inputs: torch.Tensor, want: torch.Tensor, *, device: torch.device,
                 precision: str, dtype: str) -> tuple[torch.Tensor, float]:
    """Run ``teacher`` on ``inputs`` and compare with the cached logits ``want`` within ``dtype``'s tolerance:
    a bool per row (True: outside the tolerance) and the largest difference."""
    atol, rtol = TOLERANCE[dtype]
    teacher.eval()
    with autocast(device, precision):
        live = teacher(inputs).float()
    want = want.float()
    err = (live - want).abs()
    return ~(err <= atol + rtol * want.abs()).all(dim=1), err.max().item()  # NaN: outside


def check_live(teacher: nn.Module, inputs: Callable[[], torch.Tensor], want: torch.Tensor, *, device: torch.device,
               precision: str, dtype: str, epoch: int, what: str, sampled: str, path, again: str) -> float:
    """The per-epoch check of a cache (``what``) against the live teacher: run it on ``inputs()`` (sampled entries)
    and compare with the cached logits ``want`` within ``dtype``'s tolerance; a disagreement stops the run (a stale
    or misaligned cache must not silently teach wrong targets). Returns the largest difference."""
    wrong, err = disagreement(teacher, inputs(), want, device=device, precision=precision, dtype=dtype)
    if bool(wrong.any()):
        raise KdrunError(f"{what} disagrees with the live teacher at epoch {epoch} (max |diff| {err:.3g} "
                         f"on {sampled}): the cache is stale or misaligned; delete {path} (the next run {again} it) "
                         f"or run with teacher.cache=off")
    return err
