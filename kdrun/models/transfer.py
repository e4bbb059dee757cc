"""Transfer-learning initialisation of the student: ``student.init`` and ``student.freeze``.

``student.init`` says where the student's initial weights come from:

- ``null``: random, from the run's seed (the default);
- ``teacher``: every tensor of the teacher whose name and shape match (same-architecture injection);
- ``imagenet``: torchvision's ImageNet weights of the student's architecture, read from the local torch hub
  cache (``$TORCH_HOME/hub/checkpoints``); never downloaded at run time;
- a checkpoint path: kdrun's, torchdistill's or a plain ``state_dict``, read with ``weights_only=True``.

Tensors are matched by name and shape; the rest keep their seeded random init. A classifier head whose
class count differs from the data's (a source trained on other classes) is re-initialised that way, and a
source of which no parameter matches is an error, never a silent training from scratch.

``student.freeze`` lists parameter-name prefixes (``features``, ``layer1.0``, ``fc.weight``): their
parameters get ``requires_grad=False`` (the optimizer leaves them out), and every module under a prefix runs
in eval mode even while the rest trains, so frozen BatchNorm layers keep their running statistics and
frozen dropout is off: the frozen part is bit-identical at the end.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from kdrun.errors import ConfigError, KdrunError, keyed
from kdrun.models.checkpoint import read_checkpoint, state_dict_of, weights_sha256
from kdrun.records import file_sha256, not_regular

log = logging.getLogger("kdrun")
# registry name -> torchvision weights enum (its DEFAULT entry names the file in the hub cache)
IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
                    "mobilenet": "MobileNet_V2_Weights", "mobilenet_v3_small": "MobileNet_V3_Small_Weights"}
TeacherProvider = Callable[[], tuple[nn.Module, dict]]


def initialise(model: nn.Module, student, num_classes: int, teacher: Optional[TeacherProvider] = None,
               role: str = "student") -> dict:
    """Apply ``<role>.init`` then ``<role>.freeze`` to a freshly built ``model``; log and return the record."""
    info: dict = {"source": "random"}
    if student.init is not None:
        state, provenance = read_source(student.init, student.name, teacher, role)
        info = copy_matching(model, state, provenance, num_classes, role)
        log.info(describe(info, role))
    if student.freeze:
        info["freeze"] = freeze(model, student.freeze, role)
        f = info["freeze"]
        log.info(f"{role}.freeze={f['prefixes']}: {f['tensors']} tensors ({f['params']:,} params) frozen, "
                 f"{f['modules_in_eval']} modules held in eval mode, {f['trainable_params']:,} params train")
    return info


def describe(info: dict, role: str = "student") -> str:
    """One log line: what was copied from where, and what was re-initialised."""
    text = (f"{role}.init={info['source']}: copied {info['tensors_copied']}/{info['tensors_total']} tensors "
            f"({100 * info['params_copied'] / max(1, info['params_total']):.1f}% of parameters) from "
            f"{info['path'] or info['source']} (sha256 {info['sha256']})")
    if info["head_reinitialised"]:
        text += (f"; classifier head {', '.join(info['head'])} re-initialised (source has {info['source_classes']}"
                 f" classes)")
    if info["skipped"]:
        text += f"; shapes differ, left random: {', '.join(info['skipped'][:3])}"
    return text


def check_config(model_cfg, role: str = "student") -> None:
    """Early checks of ``<role>.init`` (before any teacher or data is touched)."""
    spec = model_cfg.init
    sources = "null, teacher, imagenet or a checkpoint path" if role == "student" else "null, imagenet or a checkpoint path"
    if spec == "imagenet":
        imagenet_file(model_cfg.name if not model_cfg.target else model_cfg.target, role)
    elif spec == "teacher" and role != "student":
        raise ConfigError(f"{role}.init", f"{role} cannot start from the teacher; expected {sources}")
    elif spec not in (None, "teacher") and Path(spec).is_dir():
        raise ConfigError(f"{role}.init", f"{spec} is a directory, not a checkpoint file (expected {sources})")
    elif spec not in (None, "teacher") and (kind := not_regular(Path(spec))):
        raise ConfigError(f"{role}.init", f"{spec} is {kind}, not a regular file (expected {sources})")
    elif spec not in (None, "teacher") and not Path(spec).is_file():
        raise ConfigError(f"{role}.init", f"{spec} does not exist (expected {sources})")
    # freeze prefixes need the model: checked by kdrun.stages.common.preflight, before any training (no model is built
    # while validating the config)


def imagenet_file(model_name: str, role: str = "student") -> Path:
    """Where torchvision keeps ``model_name``'s ImageNet weights; an error naming the key if not there."""
    if model_name not in IMAGENET_WEIGHTS:
        raise ConfigError(f"{role}.init", f"imagenet weights exist for {', '.join(IMAGENET_WEIGHTS)}; not for {model_name}")
    import torchvision.models as tvm

    weights = getattr(tvm, IMAGENET_WEIGHTS[model_name]).DEFAULT
    name = Path(urlparse(weights.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        raise ConfigError(f"{role}.init", f"imagenet weights of {model_name} ({weights}) are not in the local torch hub "
                               f"cache: put {name} (from {weights.url}) at {path} (or set TORCH_HOME), or pass a "
                               f"checkpoint path; kdrun never downloads weights at run time")
    return path


def read_source(spec: str, model_name: str, teacher: Optional[TeacherProvider],
                role: str = "student") -> tuple[dict, dict]:
    """``(state_dict, provenance)`` of ``student.init``; provenance = ``source``, ``path``, ``sha256``.

    For ``teacher`` the hash is of the teacher's weights (tensor bytes) and the path is its store entry or
    ``teacher.ckpt``; otherwise it is the file's sha256 (16 hex digits).
    """
    if spec == "teacher":
        model, info = teacher()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        path = info.get("ckpt") or info.get("store_dir")
        return state, {"source": "teacher", "name": info.get("name"), "path": path, "sha256": weights_sha256(state)}
    if spec == "imagenet":
        path, source = imagenet_file(model_name, role), "imagenet"
    else:
        path, source = Path(spec), "checkpoint"
    try:
        state = state_dict_of(read_checkpoint(path, what=f"{role}.init"))
    except KdrunError as exc:  # unreadable input: exit 2
        raise keyed(f"{role}.init", exc) from None
    if not state:
        raise ConfigError(f"{role}.init", f"{path} holds no weights (no tensors found)")
    return state, {"source": source, "path": str(path.resolve()), "sha256": file_sha256(path)}


def match(own: dict, source: dict, num_classes: int) -> dict:
    """Sort the student's tensors ``own`` against ``source`` by name and shape.

    Returns ``copy`` (name -> source tensor), ``head`` (names whose class dimension differs: the classifier
    head of a source trained on another class count), ``skipped`` (same name, other shape) and ``absent``
    (not in the source).
    """
    out = {"copy": {}, "head": [], "skipped": [], "absent": []}
    for name, target in own.items():
        src = source.get(name)
        if src is None:
            out["absent"].append(name)
        elif src.shape == target.shape:
            out["copy"][name] = src
        elif (target.dim() >= 1 and target.shape[0] == num_classes and src.dim() == target.dim()
              and src.shape[1:] == target.shape[1:]):
            out["head"].append(name)
        else:
            out["skipped"].append(f"{name} {tuple(src.shape)}->{tuple(target.shape)}")
    return out


def copy_matching(model: nn.Module, source: dict, provenance: dict, num_classes: int,
                  role: str = "student") -> dict:
    """Copy ``source``'s matching tensors into ``model``; the summary's ``student.init`` record."""
    own = model.state_dict()
    found = match(own, source, num_classes)
    params = dict(model.named_parameters())
    if not any(name in params for name in found["copy"]):
        theirs = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(source.items())[:3])
        mine = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(own.items())[:3])
        raise ConfigError(f"{role}.init", f"no tensor of {provenance['path'] or provenance['source']} matches the {role} "
                               f"(names/shapes): it has {theirs}, ...; the {role} has {mine}, ...")
    with torch.no_grad():
        for name, tensor in found["copy"].items():
            own[name].copy_(tensor)
    copied_params = sum(params[n].numel() for n in found["copy"] if n in params)
    info = {**provenance, "tensors_copied": len(found["copy"]), "tensors_total": len(own),
            "params_copied": copied_params, "params_total": sum(p.numel() for p in params.values()),
            "head_reinitialised": bool(found["head"]), "head": found["head"],
            "skipped": found["skipped"][:8], "not_in_source": len(found["absent"])}
    if found["head"]:
        info["source_classes"] = int(source[found["head"][0]].shape[0])
    return info


def frozen_names(model: nn.Module, prefixes: list[str], role: str = "student") -> list[str]:
    """Parameter names under ``prefixes``; a prefix that matches nothing is an error listing valid ones."""
    names = [n for n, _ in model.named_parameters()]
    out = []
    for prefix in prefixes:
        hits = [n for n in names if _under(n, prefix)]
        if not hits:
            starts = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))  # module paths, model order
            raise ConfigError(f"{role}.freeze", f"{prefix!r} matches no parameter; parameters start with: "
                                          f"{', '.join(starts[:24])}{', ...' if len(starts) > 24 else ''}")
        out += [n for n in hits if n not in out]
    return out


def _under(name: str, prefix: str) -> bool:
    prefix = str(prefix).rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def freeze(model: nn.Module, prefixes: list[str], role: str = "student") -> dict:
    """Freeze the parameters under ``prefixes`` and hold the modules under them in eval mode."""
    names = set(frozen_names(model, prefixes, role))
    params = dict(model.named_parameters())
    if names == set(params):
        raise ConfigError(f"{role}.freeze", f"{list(prefixes)} freezes every parameter: nothing would train")
    for name in names:
        params[name].requires_grad_(False)
    held = [m for n, m in model.named_modules() if n and any(_under(n, p) for p in prefixes)]
    for module in held:
        module.register_forward_pre_hook(_hold_eval)
    frozen = sum(params[n].numel() for n in names)
    return {"prefixes": list(prefixes), "tensors": len(names), "params": frozen,
            "trainable_params": sum(p.numel() for p in params.values()) - frozen, "modules_in_eval": len(held)}


def _hold_eval(module: nn.Module, _inputs) -> None:
    """Forward pre-hook: a frozen module behaves as at inference (BN running stats used, not updated)."""
    module.training = False


def store_key_part(info: dict) -> dict:
    """What of the init goes into a baseline's store key (nothing for a random, unfrozen student)."""
    if info.get("source", "random") == "random" and not info.get("freeze"):
        return {}
    return {"init": {"source": info["source"], "sha256": info.get("sha256")},
            "freeze": (info.get("freeze") or {}).get("prefixes", [])}
