"""Experiment trackers: ``logger=[tensorboard,mlflow,wandb]`` also sends a run to TensorBoard, MLflow or W&B.

One tracker run per kdrun run (one Hydra job). Each tracker gets:

- at the start, the resolved config as parameters (flattened: ``trainer.epochs``; W&B takes it nested);
- every stage's per-epoch record (the ``metrics.jsonl`` line) as metrics ``<stage>/<key>`` at step = epoch:
  ``student/train/loss``, ``teacher/val/acc``, ``baseline/lr``, ``gen1/time_s`` ...;
- at the end, also when the run failed: the numbers of ``summary.json`` as ``summary/<key>`` (nested keys joined
  with ``/``: ``summary/student/test_acc_best``), then the run dir's PNGs and ``checkpoints/student_best.pt``
  (``student_last.pt`` under ``trainer.select=last``) as artifacts, then the run's status.

Runs of one sweep share a group: ``logger_options.group``, by default the sweep dir (a parent of the run dir
holding Hydra's ``multirun.yaml``). Where each writes: :class:`TensorBoardTracker`, :class:`MlflowTracker`,
:class:`WandbTracker`.

A tracker is never a reason for a run to fail: a missing library, an unreachable server or any exception
disables that tracker with one warning line, and the run's own files are complete either way. The libraries
are imported only when named in ``logger`` (this module imports none of them).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kdrun.schema.trackers import LoggerOptions

log = logging.getLogger("kdrun")
OWN_DIRS = ("tb", "mlflow", "wandb")  # the trackers' own files in the run dir: never artifacts
STUDENT_CHECKPOINT = Path("checkpoints") / "student_{select}.pt"  # trainer.select's checkpoint (summary "select")
SWEEP_MARKER = "multirun.yaml"  # Hydra writes it into the sweep dir before the jobs run
SWEEP_DEPTH = 3  # a job dir is <sweep dir>/<subdir>, the subdir at most this deep
MLFLOW_MAX_PARAM = 6000  # characters of a parameter value MLflow stores
STATUS_CODES = {"completed": 0, "interrupted": 130}


@dataclass
class RunInfo:
    """What a tracker is told when the run starts."""
    out_dir: Path
    config: dict              # the resolved config, nested
    params: dict[str, Any]    # the same, flattened with dotted keys; lists as text
    name: str                 # the run's name: its dir's name (in a sweep: <sweep dir name>/<job subdir>)
    group: Optional[str]      # logger_options.group, or the sweep dir
    options: LoggerOptions
    sweep: Optional[Path] = None  # the sweep dir of a multirun's job


class Tracker:
    """One backend. Every method may raise: :class:`Trackers` turns that into one warning and drops the tracker."""
    name = ""

    def start(self, run: RunInfo) -> str:
        """Open the tracker run (import the library here); return where it writes, for the log and summary."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_summary(self, summary: dict[str, float]) -> None:
        raise NotImplementedError

    def log_artifacts(self, paths: list[Path]) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        """Close the tracker run; ``status`` is the run's (completed, failed, interrupted)."""
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in ``<run dir>/tb/`` (``tensorboard --logdir <run or sweep dir>``): scalars per stage and
    epoch, the config as text and as HParams (with the summary's numbers as its metrics), PNGs as images."""
    name = "tensorboard"

    def start(self, run: RunInfo) -> str:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.writer = SummaryWriter(log_dir=str(run.out_dir / "tb"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in run.params.items()))  # as code
        return str(run.out_dir / "tb")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_summary(self, summary: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for key, value in summary.items():
            self.writer.add_scalar(key, value, 0)
        params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.run.params.items()
                  if v is not None}
        for event in hparams(params, summary):  # the HParams tab: one row per run, compared across a sweep
            self.writer.file_writer.add_summary(event)

    def log_artifacts(self, paths: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(_relative(path, self.run.out_dir), pixels, 0, dataformats="HWC")
        self.writer.add_text("artifacts", "\n".join(f"    {p}" for p in paths))

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class MlflowTracker(Tracker):
    """``logger_options.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the run dir,
    or for a sweep's job in the sweep dir, shared by its jobs: ``<dir>/mlflow/mlflow.db``, artifacts in
    ``<dir>/mlflow/artifacts`` (MLflow 3 no longer takes a plain directory as store). Experiment:
    ``logger_options.mlflow.experiment``, else the group, else ``logger_options.project``; the run is tagged
    ``kdrun.group`` and ``kdrun.run_dir``."""
    name = "mlflow"

    def start(self, run: RunInfo) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        options = run.options.mlflow
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            from filelock import FileLock

            root = ((run.sweep or run.out_dir) / "mlflow").resolve()
            root.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()
            with FileLock(str(root / ".create.lock")):  # parallel jobs of a sweep: one creates the tables
                self.client = MlflowClient(tracking_uri=uri)
        else:
            self.client = MlflowClient(tracking_uri=uri)
        self.root = run.out_dir
        experiment = options.experiment or run.group or run.options.project
        tags = {"kdrun.run_dir": str(run.out_dir.resolve()), **({"kdrun.group": run.group} if run.group else {})}
        self.run_id = self.client.create_run(self._experiment(experiment, artifacts), run_name=run.name,
                                             tags=tags).info.run_id
        params = [Param(k, str(v)[:MLFLOW_MAX_PARAM]) for k, v in run.params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return f"{uri} (experiment {experiment!r}, run {self.run_id})"

    def _experiment(self, name: str, artifacts: Optional[str]) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # created meanwhile by another job of the sweep
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_summary(self, summary: dict[str, float]) -> None:
        self.log_metrics(summary, 0)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            folder = Path(_relative(path, self.root)).parent
            self.client.log_artifact(self.run_id, str(path), None if folder == Path(".") else str(folder))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


class WandbTracker(Tracker):
    """A W&B run in ``<run dir>/wandb/`` (``wandb sync`` uploads an offline one), project
    ``logger_options.wandb.project`` (else ``logger_options.project``), ``group`` the group, mode
    ``logger_options.wandb.mode`` (else ``$WANDB_MODE``). Each stage's metrics are plotted against its own
    ``<stage>/epoch``; the checkpoint and PNGs are W&B artifacts (``model`` and ``plots``)."""
    name = "wandb"

    def start(self, run: RunInfo) -> str:
        import wandb

        options = run.options.wandb
        self.stages: set[str] = set()
        self.root = run.out_dir
        self.run = wandb.init(project=options.project or run.options.project, entity=options.entity,
                              group=run.group, name=run.name, dir=str(run.out_dir), config=run.config,
                              mode=options.mode, job_type="kdrun",
                              settings=wandb.Settings(silent=True, console="off"))
        return f"{Path(self.run.dir).parent} ({self.run.settings.mode})"  # run.dir is its files/ folder

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stages = {key.split("/", 1)[0] for key in metrics}
        for stage in stages - self.stages:  # W&B's own step only grows: each stage gets its epoch axis
            self.run.define_metric(f"{stage}/epoch")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/epoch")
        self.stages |= stages
        self.run.log({**metrics, **{f"{stage}/epoch": step for stage in stages}})

    def log_summary(self, summary: dict[str, float]) -> None:
        self.run.summary.update(summary)

    def log_artifacts(self, paths: list[Path]) -> None:
        import wandb

        for kind, files in (("model", [p for p in paths if p.suffix == ".pt"]),
                            ("plots", [p for p in paths if p.suffix == ".png"])):
            if files:
                artifact = wandb.Artifact(f"{kind}-{self.run.id}", type=kind)
                for path in files:
                    artifact.add_file(str(path), name=_relative(path, self.root), policy="immutable")
                self.run.log_artifact(artifact)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=STATUS_CODES.get(status, 1))


BACKENDS: dict[str, Callable[[], Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker,
                                              "wandb": WandbTracker}


class Trackers:
    """The run's trackers (``logger``): each call reaches every tracker still on; one that raises is dropped
    with one warning line (:meth:`_call`)."""

    def __init__(self, trackers: list[Tracker], status: Optional[dict[str, str]] = None):
        self.active, self.where = list(trackers), dict(status or {})

    @classmethod
    def start(cls, names: list[str], options: LoggerOptions, cfg_dict: dict, out_dir: Path) -> Trackers:
        """Start the trackers ``names`` for the run in ``out_dir`` with the resolved config ``cfg_dict``."""
        trackers = cls([])
        if not names:
            return trackers
        out_dir = Path(out_dir).resolve()
        sweep = sweep_dir(out_dir)
        group = options.group or (str(sweep) if sweep else None)
        name = f"{sweep.name}/{out_dir.relative_to(sweep)}" if sweep else out_dir.name
        run = RunInfo(out_dir, cfg_dict, flatten(cfg_dict, "."), name, group, options, sweep)
        for tracker in (BACKENDS[n]() for n in names):
            trackers.active.append(tracker)
            where = trackers._call(tracker, "start", run)
            if where is not None:
                trackers.where[tracker.name] = where
                log.info(f"logger {tracker.name}: {where}")
        return trackers

    def writer(self, stage: str) -> Callable[[dict], None]:
        """A per-epoch writer for :class:`kdrun.stages.common.EpochLogger`: ``stage``'s records to every tracker."""
        return lambda record: self.log_epoch(stage, record)

    def log_epoch(self, stage: str, record: dict) -> None:
        metrics = {f"{stage}/{key}": value for key, value in flatten(record, "/").items()
                   if key not in ("epoch", "stage") and _number(value)}
        for tracker in list(self.active):
            self._call(tracker, "log_metrics", metrics, int(record["epoch"]))

    def status(self) -> dict:
        """``{"trackers": {name: where it writes, or why it is off}}`` for ``summary.json``; {} without any."""
        return {"trackers": dict(self.where)} if self.where else {}

    def finish(self, summary: dict, out_dir: Path) -> None:
        """The summary's numbers, the run's artifacts, then close each tracker run with the run's status."""
        numbers = {f"summary/{k}": v for k, v in flatten(summary, "/").items() if _number(v)}
        paths = artifacts(Path(out_dir), summary.get("select") or "best") if self.active else []
        for tracker in list(self.active):
            for what, args in (("log_summary", (numbers,)), ("log_artifacts", (paths,)),
                               ("finish", (str(summary.get("status")),))):
                if tracker in self.active:
                    self._call(tracker, what, *args)
        self.active.clear()

    def _call(self, tracker: Tracker, what: str, *args):
        """``tracker.what(*args)``; on any exception one warning, and the tracker is dropped."""
        try:
            return getattr(tracker, what)(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the run
            self.active.remove(tracker)
            if isinstance(exc, ImportError) and what == "start":
                why = f"{exc.name or tracker.name} is not installed (pip install 'kdrun[{tracker.name}]')"
            else:
                why = f"{what} failed: {type(exc).__name__}: {_first_line(exc)}"
            self.where[tracker.name] = f"off: {why}"
            log.warning(f"logger {tracker.name}: {why}; the run goes on without it")
            _close_quietly(tracker)
            return None


def sweep_dir(out_dir: Path) -> Optional[Path]:
    """The sweep dir ``out_dir`` is a job of: a parent holding Hydra's ``multirun.yaml``; for a sweeper that
    writes none (Optuna's), the parent of a job whose ``.hydra/hydra.yaml`` says ``mode: MULTIRUN``. Else None."""
    out_dir = Path(out_dir).resolve()
    for parent in list(out_dir.parents)[:SWEEP_DEPTH]:
        if (parent / SWEEP_MARKER).is_file():
            return parent
    saved = out_dir / ".hydra" / "hydra.yaml"
    if saved.is_file() and re.search(r"^\s+mode: MULTIRUN\s*$", saved.read_text(errors="replace"), re.MULTILINE):
        return out_dir.parent
    return None


def artifacts(out_dir: Path, select: str = "best") -> list[Path]:
    """The run's PNGs (any depth, outside the trackers' own dirs) and its student checkpoint (the one ``select``,
    ``trainer.select``, names), if there."""
    pngs = [p for p in out_dir.rglob("*.png") if p.is_file() and p.relative_to(out_dir).parts[0] not in OWN_DIRS]
    checkpoint = out_dir / str(STUDENT_CHECKPOINT).format(select=select)
    return sorted(pngs) + ([checkpoint] if checkpoint.is_file() else [])


def flatten(tree: Any, sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts, by index) as one level; ``sep`` joins the keys. Other lists stay whole."""
    if isinstance(tree, dict) or (isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        out: dict[str, Any] = {}
        for key, value in items:
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        return out
    return {prefix[:-len(sep)]: tree} if prefix else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def _close_quietly(tracker: Tracker) -> None:
    """Close a tracker that failed, as far as it got (W&B keeps a service process until its run is finished)."""
    try:
        tracker.finish("failed")
    except Exception:  # noqa: BLE001 - already reported once
        pass
