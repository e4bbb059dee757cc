"""The resume checkpoint :func:`kdrun.train.loop.fit` continues from, read back and checked before any of it is
loaded: whatever is wrong with it is one line naming the file, what is wrong and what to do, never a traceback from
deep inside torch.

:func:`read` checks that the file loads (``weights_only``: it never runs code) and is a dict holding every key the
training state needs (:data:`STATE_KEYS`); that ``epoch`` is a whole number in [0, epochs] with one history record per
epoch; and that it was written by the same user code (``code``: :func:`kdrun.resume.user_code`'s source hashes, the
ones store keys use). :func:`shape_problem` compares weights with a model's; :func:`loading` turns what a hook's or
the state's ``load_state_dict`` raises into the same line. :func:`recorded_code` reads the code alone, for a check
before any stage trains (:func:`kdrun.stages.common.check_resume_code`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch

from kdrun.errors import InputError

log = logging.getLogger("kdrun")
STATE_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "generator", "torch_rng", "cuda_rng", "teacher",
              "history")  # what TrainState.load_state_dict reads (``loss``, ``hooks`` and ``code`` came later)
DICTS = ("model", "optimizer", "scheduler", "scaler", "teacher")
OLD_LAYOUT = ("best_state", "best_epoch", "best_val_acc")  # earlier versions: the best epoch at the top level


def damaged(path: Path, stage: str, problem: str) -> InputError:
    """The one-line error for the resume checkpoint ``path`` of stage ``stage``."""
    return InputError(f"resume checkpoint {path} {problem}; delete it to train stage {stage} again from its first "
                      f"epoch")


def read(path: Path, stage: str, epochs: int, code: dict) -> dict:
    """The resume checkpoint at ``path`` of a stage of ``epochs`` epochs, checked (module docstring), with its hooks'
    states under ``hooks`` (also for a checkpoint of the earlier layout)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - cut short, not a torch file, or holding code (weights_only refuses)
        raise damaged(path, stage, f"cannot be read: cut short, damaged or not a checkpoint ({type(exc).__name__}: "
                                   f"{first_line(exc)})") from None
    if not isinstance(saved, dict):
        raise damaged(path, stage, f"is not a resume checkpoint (it holds a {type(saved).__name__})")
    missing = [k for k in (*STATE_KEYS, *(() if "hooks" in saved else OLD_LAYOUT)) if k not in saved]
    if missing:
        raise damaged(path, stage, f"lacks {', '.join(map(repr, missing))} (written by another kdrun version, or "
                                   f"edited)")
    epoch, history = saved["epoch"], saved["history"]
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise damaged(path, stage, f"says epoch {epoch!r}, which is not a whole number")
    if not 0 <= epoch <= epochs:
        raise damaged(path, stage, f"says epoch {epoch}, which is outside [0, {epochs}] (the stage's epochs)")
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(r, dict) for r in history):
        count = len(history) if isinstance(history, list) else f"a {type(history).__name__} of"
        raise damaged(path, stage, f"holds {count} epoch record(s) for epoch {epoch}")
    for key in (*DICTS, *(("hooks",) if "hooks" in saved else ())):
        if not isinstance(saved[key], dict):
            raise damaged(path, stage, f"holds a {type(saved[key]).__name__} as {key!r}, not a dict")
    if "hooks" not in saved:
        saved["hooks"] = {"KeepBest": {k: saved[k] for k in OLD_LAYOUT}
                          | {"best_loss_state": saved.get("best_loss_state", {})}}
    check_code(path, stage, saved.get("code"), code)
    return saved


def recorded_code(path: Path) -> Optional[dict]:
    """The user's code the resume checkpoint ``path`` records (``code``); None when it records none or cannot be read
    (:func:`read` says why when its stage starts). Its tensors are mapped, not read."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - reported by read() as the stage starts
        return None
    code = saved.get("code") if isinstance(saved, dict) else None
    return code if isinstance(code, dict) else None


def check_code(path: Path, stage: str, saved: Optional[dict], now: dict) -> None:
    """Refuse a checkpoint written by other user code than ``now`` (``{key: {"callable", "file", "sha256"}}``)."""
    if saved is None:  # written before checkpoints recorded the code: nothing to compare
        if now:
            log.warning(f"resume checkpoint {path} records no source hashes (an earlier kdrun wrote it): "
                        f"{', '.join(now)} not checked for changes")
        return
    if not isinstance(saved, dict):
        raise damaged(path, stage, f"holds a {type(saved).__name__} as 'code', not a dict")
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key) or {}, now.get(key) or {}
        if not isinstance(old, dict) or old.get("sha256") != new.get("sha256"):
            old = old if isinstance(old, dict) else {}
            what = new.get("callable") or old.get("callable")
            raise InputError(f"resume checkpoint {path} was written by other code: {key} {what} in "
                             f"{new.get('file') or old.get('file')}: sha256 {old.get('sha256')} -> "
                             f"{new.get('sha256')}; restore that code to resume, or delete the file to train stage "
                             f"{stage} again with the code as it is")


def shape_problem(saved: dict, expected: dict, common_only: bool = False) -> Optional[str]:
    """What keeps the weights ``saved`` from loading into a model whose state dict is ``expected``; None: nothing.
    ``common_only``: compare the names both have (a pruned model's names change as its pruning starts)."""
    if not common_only:
        missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        if missing or extra:
            return f"{'lacks ' + missing[0] if missing else 'holds ' + extra[0]}, which the model " \
                   f"{'has' if missing else 'has not'}"
    for name in expected.keys() & saved.keys():
        value = saved[name]
        if not isinstance(value, torch.Tensor):
            return f"{name} is a {type(value).__name__}, not a tensor"
        if value.shape != expected[name].shape:
            return f"{name} has shape {list(value.shape)} in the file, {list(expected[name].shape)} in the model"
    return None


@contextlib.contextmanager
def loading(path: Path, stage: str, what: str) -> Iterator[None]:
    """Run a ``load_state_dict`` of ``what``: what it raises becomes :func:`damaged`'s line."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a field of the wrong type or layout, deep inside torch
        raise damaged(path, stage, f"has {what} that does not load ({type(exc).__name__}: {first_line(exc)})") \
            from None


def first_line(exc: BaseException) -> str:
    """The first sentence of ``exc``'s message (torch's go on for lines)."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
