"""Accuracies of a fixed set of configurations, for comparing two versions of kdrun on one machine.

Runs every configuration below in this process (Hydra's compose API + ``kdrun.run.run``, stores in a fresh
temporary dir), and prints one JSON line per configuration with the accuracies of its ``summary.json``. Run it
on two checkouts and diff the outputs: a change that keeps behaviour prints the same lines.

Covers every mode, every loss, the logit and view caches, resume (a run stopped after an epoch, then resumed)
and the pruned student.

    python benchmarks/same_numbers.py > after.jsonl
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "offline_kd": [],
    "offline_kd_cnn": ["student=cnn"],
    "loss_ce": ["loss=ce"],
    "loss_mse": ["loss=mse"],
    "loss_soft_ce": ["loss=soft_ce"],
    "loss_hard": ["loss=hard"],
    "loss_dkd": ["loss=dkd"],
    "loss_dist": ["loss=dist"],
    "loss_fitnet": ["loss=fitnet", "student=cnn"],
    "loss_at": ["loss=at", "student=cnn"],
    "logit_cache_off": ["teacher.cache=off"],
    "view_cache": ["student=cnn", "dataset.augment.crop_padding=1", "dataset.augment.hflip=true"],
    "semi": ["mode=semi", "mode.labeled_fraction=0.2"],
    "semi_rounds": ["mode=semi", "mode.labeled_fraction=0.2", "mode.iterations=2"],
    "self_born_again": ["mode=self", "mode.generations=2"],
    "self_snapshot": ["mode=self", "mode.method=snapshot", "mode.teacher_epoch=1", "trainer.epochs=3"],
    "merge": ["mode=merge"],
    "assistant": ["mode=assistant"],
    "pruned": ["student.prune.amount=0.5"],
    "transfer": ["student=cnn", "student.init=teacher"],
}
RESUMED = {"resume_offline": (["trainer.epochs=3"], "student", 1),
           "resume_pruned": (["student.prune.amount=0.5", "trainer.epochs=3"], "student_pruned", 1)}
KEYS = ("val_acc", "test_acc", "val_acc_best", "test_acc_best", "test_acc_last", "best_epoch")


def accuracies(summary: dict) -> dict:
    """Every accuracy figure of a summary, by ``role.key`` (teacher, baseline, student, further stages)."""
    out = {}
    for role, value in sorted(summary.items()):
        if isinstance(value, dict):
            for key in KEYS:
                if key in value:
                    out[f"{role}.{key}"] = value[key]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, row in enumerate(value):
                for key in KEYS:
                    if key in row:
                        out[f"{role}[{i}].{key}"] = row[key]
    return out


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    try:
        from kdrun.schema.configstore import register_configs
    except ImportError:  # versions before the schema's Hydra part was a module of its own
        from kdrun.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def main() -> None:
    from kdrun.run import run

    only = set(sys.argv[1:])
    base = Path(tempfile.mkdtemp(prefix="kdrun-same-"))
    os.chdir(base)
    common = ["experiment=smoke", "trainer.num_threads=1", "report=false", f"store.teachers={base / 'teachers'}",
              f"store.baselines={base / 'baselines'}"]
    for name, overrides in CONFIGS.items():
        if only and name not in only:
            continue
        try:
            summary = run(compose(*common, *overrides), base / name)
            line = {"config": name, **accuracies(summary)}
        except Exception as exc:  # noqa: BLE001 -- a configuration that fails is a line too
            line = {"config": name, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(line, sort_keys=True), flush=True)
        logging.getLogger().setLevel(logging.WARNING)
    for name, (overrides, stage, epoch) in RESUMED.items():
        if only and name not in only:
            continue
        print(json.dumps({"config": name, **resumed(base, name, common + overrides, stage, epoch)}, sort_keys=True),
              flush=True)


def resumed(base: Path, name: str, overrides: list, stage: str, epoch: int) -> dict:
    """A run stopped (a stop requested, as a signal would) after ``stage`` epoch ``epoch``, then resumed."""
    from kdrun.run import run

    try:
        from kdrun.train import interrupt
    except ImportError:
        from kdrun.train import interrupt
    from kdrun.errors import Interrupted
    from kdrun.records import JsonlWriter

    write = JsonlWriter.__call__

    def stop_after(self, record):
        write(self, record)
        if {**self.constant, **record}.get("stage") == stage and record.get("epoch") == epoch:
            interrupt._received.append(signal.SIGTERM)
    JsonlWriter.__call__ = stop_after
    try:
        run(compose(*overrides), base / name)
    except Interrupted:
        pass
    finally:
        JsonlWriter.__call__ = write
        interrupt.reset()
    return accuracies(run(compose(*overrides), base / name, resume=True))


if __name__ == "__main__":
    main()
