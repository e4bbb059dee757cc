"""``run(cfg, out_dir) -> summary``: the whole pipeline, top to bottom. No Hydra, no cwd assumptions.

1. validate the config (one-line errors naming the key), claim the run dir (:mod:`kdrun.rundir`: refused
   when another live run holds it or it already holds results);
2. write the resolved ``config.yaml``, log the loss formula and the config;
3. load the data, run the mode (``mode.name`` in the registry), whose stages fill in a typed
   :class:`kdrun.results.RunResult` (teacher, baseline, student, table rows) as each finishes;
4. write ``summary.json`` once, from the run's :class:`kdrun.results.RunSummary` (``status: completed`` with
   any ``warnings``, ``failed`` with the error and the stages that finished, re-raised, a diverged loss as
   :class:`kdrun.errors.RunFailed`; ``interrupted`` when a signal stopped it, :mod:`kdrun.train.interrupt`)
   and print a table.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from kdrun.console import Progress, attach_file_log, pct, show
from kdrun.errors import Interrupted, NoSpace, RunFailed
from kdrun.outputs.trackers import Trackers
from kdrun.records import JsonlWriter, atomic_write_text, git_sha, remove_temp_files, versions, write_json
from kdrun.results import RULES, Row, RunResult, RunSummary, other_rule, rule_acc
from kdrun.resume import check_resumable, completed
from kdrun.rundir import claim
from kdrun.schema import Config, to_object
from kdrun.train import interrupt

log = logging.getLogger("kdrun")


def run(cfg: DictConfig, out_dir: Path, resume: bool = False, overrides: Sequence[str] = ()) -> dict:
    """Run one experiment described by ``cfg`` into ``out_dir``; return the summary dict.

    ``resume``: continue the run in ``out_dir`` (same config): finished student stages are taken from their
    checkpoints, an interrupted one continues from its last checkpointed epoch (:func:`kdrun.train.loop.fit`); a
    complete run (:func:`kdrun.resume.completed`) is left as it is and its summary returned.
    ``overrides``: the command line's ``key=value`` overrides ``cfg`` was composed with; an option among them that
    the run does not read is a warning (:mod:`kdrun.schema.advice`)."""
    if resume:
        added = check_resumable(Path(out_dir), cfg, overrides)
        if added:
            log.info(f"resume: {out_dir}/config.yaml predates {', '.join(added[:5])}"
                     f"{f' (+{len(added) - 5} more)' if len(added) > 5 else ''}: taken at their defaults, which keep "
                     f"what kdrun did before them")
        if (finished := completed(Path(out_dir))) is not None:
            log.info(f"{out_dir} is complete (finished at {finished}); nothing to resume")
            return json.loads((Path(out_dir) / "summary.json").read_text())
    conf: Config = to_object(cfg)
    out_dir = claim(Path(out_dir), resume=resume)  # refuses a dir another live run holds, or one with results
    handler = attach_file_log(out_dir)
    _remove_temp_files(out_dir)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg_dict))
    started, t0 = dt.datetime.now().astimezone(), time.perf_counter()
    summary = RunSummary(status="running", out_dir=str(out_dir.resolve()), mode=conf.mode.name, seed=conf.seed,
                         started_at=started.isoformat(timespec="seconds"), git_sha=git_sha(),
                         resumed=True if resume else None)
    trackers = Trackers.start(conf.logger, conf.logger_options, cfg_dict, out_dir)  # none: nothing imported
    try:
        _execute(conf, cfg_dict, out_dir, summary, trackers, overrides)
        summary.status = "completed"
    except BaseException as caught:
        exc = caught
        if isinstance(caught, FloatingPointError):  # the loss diverged (engine.fit): one line, exit 1
            exc = RunFailed(f"{caught}; the stages that finished are kept in {out_dir / 'summary.json'}")
        if interrupt.forced() and not isinstance(caught, Interrupted):  # a second signal, raised where the program
            exc = interrupt.interrupted()                                 # was and wrapped there (an open(), a load)
        if summary.result is not None:  # failed in (or after) the mode: keep the stages that finished
            _report(conf, summary.result, out_dir, summary, note="The run did not complete: the models that finished.")
        summary.status, summary.error = "failed", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, Interrupted):  # SIGINT / SIGTERM: stopped at a safe point, resumable
            summary.status, summary.interrupted = "interrupted", exc.to_json()
        logging.getLogger("kdrun.file").error(f"run failed: {type(exc).__name__}: {exc}")
        _write_traceback(out_dir, caught)
        if exc is not caught:
            raise exc from caught
        raise
    finally:
        summary.wall_time_s = round(time.perf_counter() - t0, 3)
        summary.trackers = trackers.status().get("trackers")
        record = summary.to_json()
        unwritten = _write_summary(out_dir, record)
        trackers.finish(record, out_dir)  # also for a failed run: its summary so far, its artifacts
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if unwritten is not None:  # a failed run raises its own error, not this one
        raise unwritten
    return record


def _write_summary(out_dir: Path, record: dict) -> Optional[NoSpace]:
    """Write ``summary.json``; a full disk is logged and returned, so that it never hides why a run failed."""
    try:
        write_json(out_dir / "summary.json", record)
    except NoSpace as exc:
        log.error(f"summary.json not written: {exc}")
        return exc
    return None


def _remove_temp_files(out_dir: Path) -> None:
    """Temp files of atomic writes that an earlier run into this dir left (killed, or stopped by a full disk)."""
    for folder in (out_dir, out_dir / "checkpoints", out_dir / "figures"):
        for tmp in remove_temp_files(folder):
            log.info(f"removed {tmp}: a partial write of an earlier run")


def _execute(conf: Config, cfg_dict: dict, out_dir: Path, summary: RunSummary, trackers: Trackers,
             overrides: Sequence[str]) -> None:
    """Load the data, run the mode; ``summary.result`` is the mode's result from the moment the mode starts;
    ``trackers`` receive every stage's epochs. Warnings (:mod:`kdrun.schema.advice`, the data's, then the
    results') are logged when found and kept in ``summary.warnings``."""
    import torch

    from kdrun import registry
    from kdrun.data.dataset import load_data
    from kdrun.losses import base as losses
    from kdrun.schema.advice import config_warnings
    from kdrun.stages import RunContext, preflight
    from kdrun.train.infer import resolve_device

    loss = losses.from_config(conf.loss)
    summary.loss = {"name": loss.name, "T": loss.T, "alpha": loss.alpha, "formula": loss.formula()}
    registered = None if getattr(conf.loss, "target", None) else registry.entry("loss", conf.loss.name)
    note = (registered.note if registered else "") or "alpha weighs the soft KD term; KL batchmean"
    log.info(f"loss: {loss.formula()}   ({note})")
    show(_config_tree(cfg_dict), "config:")
    _warn(summary, config_warnings(conf, overrides, loss.needs_teacher))
    if conf.trainer.num_threads:
        torch.set_num_threads(conf.trainer.num_threads)
    device = resolve_device(conf.trainer.device)
    summary.versions = versions(str(device))
    data = load_data(conf.dataset, device)
    summary.dataset = {"name": conf.dataset.name, "train": len(data.train), "val": len(data.val),
                       "test": len(data.test), "num_classes": data.num_classes,
                       "shape": [data.channels, data.image_size, data.image_size], "class_names": data.class_names,
                       "augment": data.identity["augment"]}  # the training augmentation (mixup/CutMix when on)
    log.info(f"data {conf.dataset.name}: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}, "
             f"{data.num_classes} classes, {data.channels}x{data.image_size}x{data.image_size}, on {device}")
    if not len(data.test):  # allowed (a dataset may have no test images): said once, then test_acc is null
        _warn(summary, [f"dataset={conf.dataset.name}: the test split is empty: no test metrics (test_acc null); "
                        f"the report uses val"])
    _warn(summary, data.warnings)
    mode_entry = registry.get("mode", conf.mode.name, "mode")
    mode = mode_entry.obj
    mode_teacher = mode_entry.needs is not None and mode_entry.needs.teacher  # builds teacher.* on every class
    with Progress(conf.trainer.progress) as progress:
        ctx = RunContext(conf, cfg_dict, out_dir, device, progress,
                         JsonlWriter(out_dir / "metrics.jsonl", stage="student"), RunResult(), trackers=trackers)
        summary.result = ctx.result
        preflight(ctx, data, teacher=loss.needs_teacher and mode_teacher)
        mode(ctx, data, loss)  # fills in ctx.result as each stage is done
    # completed, but degenerate (a model at chance) or unable to show KD (a teacher no better than the baseline)
    _warn(summary, [*ctx.result.chance_warnings(data.num_classes), *ctx.result.kd_warnings()])
    set_agreements(ctx.result)
    student = ctx.result.student
    summary.select = student.select
    summary.objective = student.val_acc if student.val_acc is not None else float("nan")
    summary.delta_vs_baseline = delta = ctx.result.delta_vs_baseline()
    summary.deltas = ctx.result.deltas()
    trails_line = _report(conf, ctx.result, out_dir, summary)
    lines = [line for line in (trails_line, _deploy(conf, ctx, data, out_dir, summary)) if line]
    show(results_table(ctx.result, delta, "\n".join(lines) or None), "results:")


def set_agreements(result: RunResult) -> None:
    """The student's and the baseline's agreement with the teacher (:func:`kdrun.outputs.metrics.agreement`), from
    the test (else val) logits kept for the report: did the student learn the teacher's function, and how much more
    of it than the same model trained alone? Left unset where a model or the teacher was not scored."""
    from kdrun.outputs.metrics import agreement

    teacher = result.predictions.get("teacher")
    if teacher is None:
        return
    for role, stage in (("student", result.student), ("baseline", result.baseline)):
        prediction = result.predictions.get(role)
        if stage is not None and prediction is not None:
            stage.agreement = agreement(teacher, prediction)


def _warn(summary: RunSummary, warnings: Sequence[str]) -> None:
    """Log each of ``warnings`` (unless a stage logged it already, before training) and add it to
    ``summary.warnings``."""
    logged = summary.result.logged if summary.result is not None else ()
    for warning in warnings:
        if warning not in logged:
            log.warning(warning)
        summary.warn(warning)


def _deploy(conf: Config, ctx, data, out_dir: Path, summary: RunSummary) -> Optional[str]:
    """``export``: the student as TorchScript / ONNX (:mod:`kdrun.outputs.export`); ``compression``: the report
    (:mod:`kdrun.outputs.compression`). Adds them to ``summary``; returns the report's lines for the table."""
    from kdrun.outputs.compression import from_run
    from kdrun.outputs.export import export_run

    steps = []
    if conf.export:
        steps.append(("export", lambda: export_run(out_dir, conf.export, data, config=ctx.cfg_dict)))
    if conf.compression:
        steps.append(("compression", lambda: from_run(ctx, data)))
    for key, make in steps:
        try:  # the students are trained and saved by now: a model that does not export or time is a warning
            value = make()
        except Exception as exc:  # noqa: BLE001
            _warn(summary, [f"{key} failed: {type(exc).__name__}: {exc}"])
            continue
        if value is not None:
            setattr(summary, key, value)
    lines = (summary.compression or {}).get("lines")
    return "\n".join(lines) if lines else None


def _report(conf: Config, result: RunResult, out_dir: Path, summary: RunSummary, note: str = "") -> Optional[str]:
    """``report.json``, ``report.md`` and figures (:mod:`kdrun.outputs.report`), pointed to by ``summary["report"]``;
    returns the line naming the classes where the student trails the teacher most. A report that cannot be
    written is a warning, never a failed run."""
    from kdrun.outputs.report import write_report

    if not conf.report:
        return None
    try:
        written = write_report(out_dir, result, conf.dataset.name, conf.mode.name, note,
                               (summary.dataset or {}).get("class_names"))
    except Exception as exc:  # noqa: BLE001 -- the models are trained and saved; say what is missing
        _warn(summary, [f"report: not written ({type(exc).__name__}: {exc})"])
        return None
    if written is None:
        return None
    summary.report = written.summary
    return written.trails_line


def _agrees(stage) -> str:
    """``"; agrees with teacher 91.64 %"``: a model's top-1 agreement with the teacher (or with what its ``with``
    names: mode=online's other peers; empty when not measured)."""
    found = getattr(stage, "agreement", None) or {}
    top1 = found.get("top1")
    return "" if top1 is None else f"; agrees with {found.get('with', 'teacher')} {top1:.2f} %"



def results_table(result: RunResult, delta: Optional[float] = None, caption: Optional[str] = None):
    """The final rich table: teacher, CE baseline, KD student (and a pruned one). Val and test accuracy of the
    checkpoint ``trainer.select`` names (the title says which; the teacher's is always its best on val), the test
    accuracy of the other checkpoint beside them, Δ vs baseline under both rules; ``caption``: lines under it (the
    classes where the student trails the teacher most, the compression report)."""
    from rich.table import Table

    student = result.student
    rule = student.select
    other = other_rule(rule)
    table = Table(title=f"kdrun results (accuracy %, checkpoint: {RULES[rule]}, trainer.select={rule})",
                  caption=caption, caption_justify="left")
    for col in ("role", "model", "val acc", "test acc", f"test, {other} val" if other == "best" else "test, last",
                "note"):
        table.add_column(col, justify="left" if col in ("role", "model", "note") else "right", no_wrap=col != "note")
    teacher, baseline = result.teacher, result.baseline

    def row(role: str, stage, note: str) -> None:
        table.add_row(role, stage.name, pct(rule_acc(stage, "val", rule), ""), pct(rule_acc(stage, "test", rule), ""),
                      pct(getattr(stage, f"test_acc_{other}", None), ""), note)
    extras = result.rows or []  # a mode's further lines: a teacher's parts (members, subset teachers), generations...

    def add(extra: Row) -> None:
        table.add_row(extra.role, extra.name, pct(extra.val_acc, ""), pct(extra.test_acc, ""), "", extra.note)
    if teacher:
        table.add_row("teacher", teacher.name, pct(teacher.val_acc, ""), pct(teacher.test_acc, ""), "",
                      teacher.note)
    for extra in (e for e in extras if e.of_teacher):
        add(extra)
    if baseline:
        row("student, CE only", baseline, (baseline.note or "baseline") + _agrees(baseline))
    for extra in (e for e in extras if not e.of_teacher):
        add(extra)
    note = f"best epoch {student.best_epoch}/{student.epochs}"
    if delta is not None:
        note += f"; Δ vs baseline {delta:+.2f}"
        if (delta_other := result.delta_vs_baseline(other)) is not None:
            note += f" ({RULES[other]}: {delta_other:+.2f})"
    note += _agrees(student)
    label = result.student_role or ("student, KD" if teacher else "student")
    row(label, student, note)
    if (pruned := result.student_pruned) is not None:  # student.prune (kdrun.stages.pruning)
        acc, ref = rule_acc(pruned, "test", rule), student.test_acc
        gap = "" if None in (acc, ref) else f"; Δ vs student {acc - ref:+.2f}"
        row(f"{label}, pruned", pruned, pruned.note + gap)
    return table


def _config_tree(cfg_dict: dict):
    """The resolved config, one row per group with its ``key=value`` leaves (nested keys dotted)."""
    from rich.table import Table

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={value}"
    table = Table(title="config (resolved; saved as config.yaml)", show_header=False)
    table.add_column("group", style="bold")
    table.add_column("values")
    for key, value in cfg_dict.items():
        table.add_row(key, "  ".join(leaves(value)) if isinstance(value, dict) else str(value))
    return table


def _write_traceback(out_dir: Path, exc: BaseException) -> None:
    """Append the traceback to ``kdrun.log`` (Hydra does not log job exceptions); not on a full disk."""
    with contextlib.suppress(OSError), open(out_dir / "kdrun.log", "a") as handle:
        handle.write("".join(traceback.format_exception(exc)))
