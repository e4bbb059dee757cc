"""Checkpoint I/O: read a checkpoint file (``weights_only=True``, never code), load its weights into a model
with one-line errors, write the plain dict kdrun's checkpoints and store entries hold; the two hashes of weights
that persisted keys hold (:func:`weights_hash`, :func:`weights_sha256`). A file's hash is
:func:`kdrun.records.file_sha256`."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from kdrun.errors import ConfigError, KdrunError
from kdrun.records import check_regular


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no code execution); clear error when it is not one. Anything
    but a regular file (a FIFO would block forever, a directory, a device) is refused before it is opened."""
    check_regular(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KdrunError(f"{what}: {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise KdrunError(f"{what}: {path} is not a readable PyTorch checkpoint{_why_unreadable(exc)}") from None
    if not isinstance(obj, dict):
        raise KdrunError(f"{what}: {path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    return obj


def _why_unreadable(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line. PyTorch's own message advises
    ``weights_only=False``, which would run the file's code: never repeated here."""
    message = str(exc)
    if "weights_only" not in message:
        return f" ({type(exc).__name__}: {message.splitlines()[0] if message else ''})"
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return (f": it holds Python objects ({found.group(1)}) that kdrun does not load (it reads weights_only=True, "
                f"which runs no code from the file); save the weights instead: torch.save(model.state_dict(), path)")
    return " (it cannot be read with weights_only=True: not a PyTorch checkpoint, or a damaged one)"


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


# Two recipes for a hash of weights, kept apart on purpose: each is part of keys already persisted in users'
# stores and caches, so changing either (or merging them) would orphan those entries. Both: 16 hex digits of a
# sha256 over every tensor's name, shape and bytes.

def weights_hash(model: nn.Module) -> str:
    """Hash of a model's weights and buffers (names, shapes, values), in ``state_dict`` order.

    Keys it is part of: the teacher-logit cache (:mod:`kdrun.teacher.logit_cache`, ``<store.teachers>/logit-cache``),
    the view cache (:mod:`kdrun.teacher.view_cache`, ``view-cache``), and the in-process memo of a frozen model's
    evaluation (:func:`kdrun.stages.common.evaluate_frozen`). The dtype is not hashed (a model's bytes change with it).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_sha256(state: dict) -> str:
    """Hash of a state_dict's names, shapes, dtypes and bytes, names sorted (works for any dtype, bfloat16 too).

    Key it is part of: ``student.init=teacher``'s provenance ``init.sha256`` (:func:`kdrun.models.transfer.read_source`),
    which is in the store key of the CE baseline (:func:`kdrun.models.transfer.store_key_part`) and in
    ``summary.json``.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
