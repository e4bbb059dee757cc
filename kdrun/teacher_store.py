"""Content-addressed store of trained models (teachers, CE baselines) and checkpoint loading.

An entry is ``<root>/<model name>-<key hash>/`` holding ``model.pt`` (a plain dict: ``model`` state_dict,
``meta``), ``metrics.jsonl`` of its training and ``key.json``, the human-readable parts of its key: model
config, dataset identity, training recipe and seed. Entries are trained under a file lock (parallel sweep
jobs train a model once) into a temp dir that is renamed into place when complete, so an entry is either
whole or absent, and a failure later in the run never loses it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from filelock import FileLock
from torch import nn

from kdrun.errors import ConfigError, KdrunError
from kdrun.records import save_torch, write_json

log = logging.getLogger("kdrun")
CHECKPOINT = "model.pt"


def key_hash(parts: dict) -> str:
    """Stable 12-hex-digit hash of a JSON-able key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_or_reuse(root: Path, name: str, key: dict, train: Callable[[Path], dict]) -> tuple[dict, Path, bool]:
    """Return ``(checkpoint, entry_dir, reused)`` for ``key``, calling ``train(tmp_dir) -> checkpoint`` on a miss.

    ``train`` writes whatever it likes (metrics.jsonl, ...) into ``tmp_dir``; the checkpoint it returns is
    saved there, and the dir is renamed into place atomically.
    """
    root = Path(root)
    entry = root / f"{name}-{key_hash(key)}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{entry.name}.lock")):
        if (entry / CHECKPOINT).exists():
            return read_checkpoint(entry / CHECKPOINT, what=f"store entry {entry}"), entry, True
        if entry.exists():  # an incomplete entry (no checkpoint): set it aside, never delete results
            os.replace(entry, entry.with_name(entry.name + f".incomplete-{os.getpid()}"))
        tmp = root / f".{entry.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_json(tmp / "key.json", key)
            checkpoint = train(tmp)
            save_torch(tmp / CHECKPOINT, checkpoint)
            os.replace(tmp, entry)
        finally:  # a failed training leaves nothing half-made behind
            shutil.rmtree(tmp, ignore_errors=True)
    return checkpoint, entry, False


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no code execution); clear error when it is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KdrunError(f"{what}: {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise KdrunError(f"{what}: {path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(obj, dict):
        raise KdrunError(f"{what}: {path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    return obj


def state_dict_of(checkpoint: dict) -> dict:
    """The model weights in kdrun's layout (``model``), torchdistill's (``model``), or a plain state_dict."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def load_weights(model: nn.Module, checkpoint: dict, *, key: str, model_name: str, num_classes: int,
                 source: str) -> None:
    """Load ``checkpoint`` into ``model`` strictly; errors name ``key`` and say what does not match."""
    state = state_dict_of(checkpoint)
    if not state:
        raise ConfigError(key, f"{source} holds no weights (no tensors found)")
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            if own[name].shape[0] == num_classes and tensor.shape[:1] != own[name].shape[:1]:
                raise ConfigError(key, f"{source} has {tensor.shape[0]} classes (layer {name}) but the dataset "
                                       f"has {num_classes}")
            raise ConfigError(key, f"{source} is not a checkpoint of {model_name}: {name} has shape "
                                   f"{tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(key, f"{source} is not a checkpoint of {model_name}: {detail}")
    model.load_state_dict(state)


def checkpoint_dict(model_state: dict, meta: dict) -> dict:
    """kdrun's checkpoint layout: a plain dict, loadable with ``torch.load(..., weights_only=True)``."""
    return {"model": model_state, "meta": meta}


def file_sha256(path: Path) -> Optional[str]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
