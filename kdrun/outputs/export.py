"""Export the student for deployment: TorchScript and ONNX, each re-loaded and checked against PyTorch.

``export=[torchscript,onnx]`` (after a run) and ``kdrun-export RUN_DIR [--formats torchscript,onnx]
[--config-dir DIR] [--trust-code]`` (for a finished run) write, beside the run's checkpoints:

* ``checkpoints/student.ts``: ``torch.jit.trace`` of the student as ``trainer.select`` chose it (``student_best.pt``,
  best on val; ``student_last.pt`` under ``trainer.select=last``), re-loaded with ``torch.jit.load``;
* ``checkpoints/student.onnx``: the legacy TorchScript-based ONNX exporter (``torch.onnx.export(...,
  dynamo=False)``; needs the ``onnx`` package, not onnxscript), input ``images`` ``[batch, C, H, W]`` with a
  dynamic batch axis, output ``logits``; re-loaded with onnxruntime. Both come with the ``export`` extra
  (``pip install 'kdrun[export]'``); without onnxruntime the file is still written and the check is skipped
  with one warning.
* ``checkpoints/student.json``: what a deployed model needs besides its weights (:func:`deployment`): the input's
  name, shape and normalisation (``mean``, ``std``), the output's name and the class names; the same keys are in
  the ONNX file's ``metadata_props`` (lists as JSON);
* the same for a pruned student (``student_pruned_best.pt``, :mod:`kdrun.stages.pruning`): ``student_pruned.ts``,
  ``student_pruned.onnx``, ``student_pruned.json``, its zeros in the weights.

Each re-loaded model is run on the first :data:`CHECK_IMAGES` test images (normalised as in training) and its
logits compared with the PyTorch model's: ``summary.json`` ``export`` records per model and format the file,
its size, the max absolute difference and the share of equal predictions, plus the input the models expect
(shape, normalisation). Nothing here imports torch, onnx or onnxruntime at module import.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

from kdrun.errors import ConfigError, InputError, KdrunError
from kdrun.schema.export import EXPORT_FORMATS, EXTRA, check_formats
from kdrun.trust import TRUST_FLAG, Trusted, targets

log = logging.getLogger("kdrun")
CHECK_IMAGES = 64  # test images the re-loaded exports are compared on
MODELS = (("student", "student_{select}.pt"), ("student_pruned", "student_pruned_best.pt"))  # exported when present
PREPROCESS = ("pixels scaled to [0, 1] (8-bit: / 255), then (x - mean) / std per channel; "
              "layout [batch, channels, height, width], float32")
TRUST_HOW = f"pass --config-dir with the config dir the run used, or {TRUST_FLAG}"


def load_student(path: Path, config: Optional[dict] = None, trusted: Trusted = Trusted()):
    """The model of a kdrun student checkpoint (``meta`` with its shapes, ``config`` with its ``student`` node),
    rebuilt on the CPU with its weights, in eval mode; returns ``(model, checkpoint)``.

    ``config``: the run's own resolved config (a run exporting its students), built instead of the file's.
    Otherwise the file's config is built, and a ``_target_`` it names (``student``, or ``dataset``, which
    :func:`export_run` loads) must be ``trusted`` (:mod:`kdrun.trust`): nothing in the file is imported before."""
    from kdrun.models import build
    from kdrun.models.checkpoint import load_weights, read_checkpoint
    from kdrun.schema import StudentConfig, open_node

    checkpoint = read_checkpoint(path, what="kdrun-export")
    meta, own = checkpoint.get("meta"), config
    config = checkpoint.get("config") if own is None else own
    if not isinstance(meta, dict) or not isinstance(config, dict) or not isinstance(config.get("student"), dict):
        raise InputError(f"{path} is not a kdrun student checkpoint (no meta or config)")
    if own is None:
        trusted.check(targets({k: config.get(k) for k in ("student", "dataset")}), str(path), how=TRUST_HOW)
    node = {k: v for k, v in config["student"].items() if k not in ("init", "freeze")}  # weights come from the file
    model = build(open_node(StudentConfig, node, "student"), num_classes=meta["num_classes"],
                  in_channels=meta["in_channels"], image_size=meta["image_size"], key="student")
    load_weights(model, checkpoint, key="student", model_name=meta.get("name", "student"),
                 num_classes=meta["num_classes"], source=str(path))
    return model.eval(), checkpoint


def export_run(run_dir: Path, formats, data=None, config: Optional[dict] = None, trusted: Trusted = Trusted(),
               select: Optional[str] = None) -> dict:
    """Export the run's student (the checkpoint ``select`` names: ``best`` or ``last``; default ``config``'s
    ``trainer.select``, else best) and pruned student, if any, in ``formats``; check each against PyTorch on
    ``data``'s first test images (default: the run's dataset, loaded from its config). Returns the summary's
    ``export`` entry; a format that fails is one warning and an ``error`` in its entry, never an exception.
    ``config`` and ``trusted``: as for :func:`load_student`."""
    run_dir = Path(run_dir)
    select = select or ((config or {}).get("trainer") or {}).get("select") or "best"
    out: dict = {"formats": list(formats)}
    for stage, name in MODELS:
        path = run_dir / "checkpoints" / name.format(select=select)
        if not path.exists():
            continue
        model, checkpoint = load_student(path, config, trusted)
        if "input" not in out:
            inputs, out["input"], names = _check_inputs(checkpoint, data)
        deploy = deployment(checkpoint, config, out["input"], stage, names)
        out[stage] = export_model(model, path.parent / stage, formats, inputs, run_dir, deploy)
        out.setdefault("preprocessing", {})[stage] = str((path.parent / f"{stage}.json").relative_to(run_dir))
    return out


def deployment(checkpoint: dict, config: Optional[dict], inputs: dict, stage: str = "student",
               names: Optional[list] = None) -> dict:
    """What a deployed model needs besides its weights, for ``<stage>.json`` and the ONNX ``metadata_props``:
    the input's name, shape and normalisation, the output's name and the class names (``names``, the loaded
    dataset's, as in the run report; the class indices when it names none)."""
    from kdrun.outputs.report import class_names

    meta = checkpoint["meta"]
    dataset = (config or checkpoint.get("config") or {}).get("dataset") or {}
    mean, std = inputs.get("mean", dataset.get("mean")), inputs.get("std", dataset.get("std"))
    return {"model": stage, "architecture": meta.get("name"), "dataset": dataset.get("name"),
            "input_name": "images", "input_shape": inputs["shape"], "dtype": "float32", "mean": mean, "std": std,
            "preprocess": PREPROCESS, "output_name": "logits",
            "class_names": class_names(names, meta["num_classes"])}


def export_model(model, stem: Path, formats, inputs, run_dir: Optional[Path] = None,
                 deploy: Optional[dict] = None) -> dict:
    """Write ``model`` as ``stem.<suffix>`` per format, re-load it, compare its logits on ``inputs``. ``deploy``
    (:func:`deployment`): also written as ``stem.json`` (with ``files``: the exported files beside it) and into
    the ONNX file's ``metadata_props``."""
    import torch


    model, x = model.cpu().eval(), inputs.cpu().float()
    with torch.no_grad():
        reference = model(x)
    out = {}
    for fmt in formats:
        path = stem.with_name(stem.name + EXPORT_FORMATS[fmt])
        entry: dict = {"file": str(path.relative_to(run_dir) if run_dir else path)}
        try:
            with warnings.catch_warnings():  # torch.jit and the legacy ONNX exporter announce their deprecation
                warnings.simplefilter("ignore", category=FutureWarning)
                warnings.simplefilter("ignore", category=DeprecationWarning)
                _WRITERS[fmt](model, x[:2], path)
                if fmt == "onnx" and deploy is not None:
                    _onnx_metadata(path, deploy)
                entry["bytes"] = path.stat().st_size
                outputs = _RUNNERS[fmt](path, x)
        except Exception as exc:  # noqa: BLE001 - one model that does not export must not lose the run
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning(f"export {fmt} of {stem.name} failed: {entry['error']}")
            out[fmt] = entry
            continue
        if outputs is None:
            entry.update(checked=False, max_abs_diff=None, skipped="onnxruntime is not installed")
            log.warning(f"export: {path.name} written, not checked: onnxruntime is not installed ({EXTRA})")
        else:
            outputs = torch.as_tensor(outputs).float()
            entry.update(checked=True, images=len(x), max_abs_diff=float((outputs - reference).abs().max()),
                         same_predictions=float((outputs.argmax(1) == reference.argmax(1)).float().mean()))
            log.info(f"export {fmt}: {entry['file']} ({entry['bytes']:,} bytes), max |Δ logits| vs PyTorch "
                     f"{entry['max_abs_diff']:.2e} on {len(x)} images")
        out[fmt] = entry
    if deploy is not None:
        from kdrun.records import write_json

        files = {fmt: stem.name + suffix for fmt, suffix in EXPORT_FORMATS.items()
                 if stem.with_name(stem.name + suffix).exists()}  # also those of an earlier export
        write_json(stem.with_name(stem.name + ".json"), {**deploy, "files": files})
    return out


def _write_torchscript(model, example, path: Path) -> None:
    import torch

    traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))


def _run_torchscript(path: Path, x):
    import torch

    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x)


def _write_onnx(model, example, path: Path) -> None:
    import torch

    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    import onnx

    onnx.checker.check_model(str(path))


def _onnx_metadata(path: Path, deploy: dict) -> None:
    """Write ``deploy`` into the ONNX file's ``metadata_props``: strings as they are, the rest as JSON
    (onnxruntime: ``session.get_modelmeta().custom_metadata_map``)."""
    import onnx

    from kdrun.records import atomic_write_bytes

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in deploy.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    atomic_write_bytes(path, model.SerializeToString())


def _run_onnx(path: Path, x):
    """The logits of the ONNX file through onnxruntime (None when it is not installed)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


_WRITERS = {"torchscript": _write_torchscript, "onnx": _write_onnx}
_RUNNERS = {"torchscript": _run_torchscript, "onnx": _run_onnx}


def _check_inputs(checkpoint: dict, data=None):
    """The first :data:`CHECK_IMAGES` normalised test images, the input record (shape, normalisation) and the
    dataset's class names (None: it names none); from ``data``, else the run's dataset from the checkpoint's
    config; random images and no names (one warning) if it cannot be loaded."""
    import torch

    meta = checkpoint["meta"]
    if data is None:
        from kdrun.data.dataset import load_data
        from kdrun.schema import DatasetConfig, open_node

        try:
            data = load_data(open_node(DatasetConfig, checkpoint["config"]["dataset"], "dataset"), torch.device("cpu"))
        except (KdrunError, OSError, KeyError) as exc:
            log.warning(f"export: the run's test images cannot be loaded ({exc}); checking on random inputs")
    shape = [meta["in_channels"], meta["image_size"], meta["image_size"]]
    if data is not None and len(data.test):
        n = min(CHECK_IMAGES, len(data.test))
        inputs, source = data.inputs("test", torch.arange(n, device=data.test.y.device)).cpu(), "test"
        norm = {"mean": data.mean.flatten().tolist(), "std": data.std.flatten().tolist()}
    else:
        inputs, source, norm = torch.randn(CHECK_IMAGES, *shape, generator=torch.Generator().manual_seed(0)), "random", {}
    names = getattr(data, "class_names", None) if data is not None else None
    return inputs, {"shape": ["batch", *shape], "dtype": "float32", "checked_on": source, **norm,
                    "note": "images scaled to [0, 1], then (x - mean) / std per channel"}, names


def finished_run(run_dir: Path) -> dict:
    """The summary of the finished run in ``run_dir``; :class:`InputError` (one line) for anything else."""
    what = f"{run_dir} is not a finished kdrun run"
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{what}: no summary.json") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{what}: summary.json is unreadable ({type(exc).__name__})") from None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        status = summary.get("status") if isinstance(summary, dict) else None
        raise InputError(f"{what}: its status is {status!r}, not 'completed'")
    name = f"student_{summary.get('select') or 'best'}.pt"  # trainer.select's checkpoint
    if not (run_dir / "checkpoints" / name).exists():
        raise InputError(f"{what}: no checkpoints/{name}")
    return summary


def _merged(old, new: dict) -> dict:
    """``new`` export records over the run's earlier ones: formats not exported now keep their record."""
    if not isinstance(old, dict):
        return new
    out = {**old, **new, "formats": list(dict.fromkeys([*old.get("formats", []), *new["formats"]]))}
    for stage, _ in MODELS:
        if isinstance(old.get(stage), dict) and stage in new:
            out[stage] = {**old[stage], **new[stage]}
    return out


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``kdrun-export RUN_DIR [--formats torchscript,onnx]``."""
    parser = argparse.ArgumentParser(prog="kdrun-export", description=(
        "Export the student (trainer.select's checkpoint) of a finished kdrun run as TorchScript and/or ONNX into "
        "its checkpoints/ dir, check each against PyTorch on test images and record it in the run's summary.json (export)."))
    parser.add_argument("run_dir", type=Path, help="a finished run dir (holds summary.json and checkpoints/)")
    parser.add_argument("--formats", default="torchscript,onnx",
                        help=f"comma-separated, of: {', '.join(EXPORT_FORMATS)} (default: all)")
    parser.add_argument("--config-dir", action="append", default=[], type=Path, metavar="DIR",
                        help="the config dir the run used (as for kdrun): the _target_ its YAML files name may be "
                             "imported from the checkpoint's config (repeatable)")
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="import whatever _target_ the checkpoint's config names (only for a run dir you trust)")
    args = parser.parse_args(argv)
    trusted = Trusted(config_dirs=tuple(args.config_dir), code=args.trust_code)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from kdrun.records import write_json

    try:
        formats = list(dict.fromkeys(f.strip() for f in args.formats.split(",") if f.strip()))
        if not formats:
            raise ConfigError("--formats", f"name at least one of: {', '.join(EXPORT_FORMATS)}")
        check_formats("--formats", formats)
        summary = finished_run(args.run_dir)
        result = export_run(args.run_dir, formats, trusted=trusted, select=summary.get("select"))
    except KdrunError as exc:
        print(f"kdrun-export: error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, InputError) else 1)
    summary["export"] = _merged(summary.get("export"), result)
    write_json(args.run_dir / "summary.json", summary)
    entries = [(f"{stage} {fmt}", entry) for stage, _ in MODELS for fmt, entry in result.get(stage, {}).items()]
    written = [entry["file"] for _, entry in entries if "error" not in entry]
    print(f"kdrun-export: wrote {', '.join(written) or 'nothing'} in {args.run_dir}; recorded in summary.json (export)")
    if len(written) < len(entries):
        print(f"kdrun-export: error: failed: {', '.join(what for what, e in entries if 'error' in e)}", file=sys.stderr)
        sys.exit(1)
