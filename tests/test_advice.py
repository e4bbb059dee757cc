"""Runs that cannot show KD, or ignore an option the user set, complete with a warning: in the log, in
``summary.json``'s ``warnings`` and in a sweep's summary (kdrun.schema.advice, RunResult.kd_warnings, the data's
warnings, kdrun.sweep)."""
from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import compose_config, read_json, smoke_inproc

from kdrun import registry
from kdrun.outputs import compression
from kdrun.results import BaselineResult, RunResult, StudentResult, TeacherResult
from kdrun.schema import to_object
from kdrun.schema.advice import config_warnings, set_keys


def warnings_of(*overrides: str, reads_teacher: bool = True) -> list[str]:
    """The config-level warnings of ``kdrun OVERRIDES``; ``reads_teacher``: what the built loss says."""
    return config_warnings(to_object(compose_config(*overrides)), overrides, reads_teacher)


@pytest.mark.parametrize("loss", registry.names("loss"))
def test_every_loss_at_its_defaults_warns_of_nothing(loss):
    assert warnings_of(f"loss={loss}", reads_teacher=loss != "ce") == []


@pytest.mark.parametrize("mode", registry.names("mode"))
def test_every_mode_at_its_defaults_warns_of_nothing(mode):
    extra = ("mode.method=snapshot", "mode.teacher_epoch=1") if mode == "self" else ()
    assert warnings_of(f"mode={mode}", *extra) == []


@pytest.mark.parametrize("overrides, expected", [
    (("loss=ce", "loss.T=8"), "loss.T=8: not used (loss=ce has no teacher term)"),
    (("loss=mse", "loss.T=2"), "loss.T=2: not used (loss=mse compares raw logits, without a temperature)"),
    (("loss=hard", "loss.T=2"), "loss.T=2: not used (loss=hard takes the teacher's argmax, without a temperature)"),
    (("loss=fitnet", "loss.T=2"), "loss.T=2: not used (loss.alpha=0 leaves no soft KD term)"),
    (("loss=at", "loss.beta=0", "loss.student_layers=[layer1]"),
     "loss.student_layers=[layer1]: not used (loss.beta=0 leaves no feature term)"),
    (("mode=self", "mode.method=snapshot", "mode.teacher_epoch=1", "mode.generations=5"),
     "mode.generations=5: not used (mode.method=snapshot does not read it)"),
    (("mode=self", "mode.teacher_epoch=3"), "mode.teacher_epoch=3: not used (mode.method=born_again does not read it)"),
    (("mode=semi", "mode.confidence=0.9"),
     "mode.confidence=0.9: not used (mode.unlabeled_target=soft keeps every unlabelled image)"),
    (("mode=self", "teacher=resnet18"), "teacher=resnet18: not used (mode=self has no separate teacher: the student "
                                        "teaches itself)"),
    (("mode=self", "teacher.epochs=5"), "teacher.epochs=5: not used (mode=self has no separate teacher: the student "
                                        "teaches itself)"),
    (("teacher=resnet20", "teacher.ensemble=[cnn,mlp]"),
     "teacher=resnet20: not used (teacher.ensemble names each member's model and args)"),
    (("teacher.ensemble=[cnn,mlp]", "teacher.args.hidden=64"),
     "teacher.args.hidden=64: not used (teacher.ensemble names each member's model and args)"),
])
def test_an_option_the_run_does_not_read_is_named(overrides, expected):
    reads_teacher = overrides[0] != "loss=ce"
    assert warnings_of(*overrides, reads_teacher=reads_teacher) == [expected]


def test_an_ensemble_of_seeds_reads_the_teachers_model_and_an_ensemble_its_shared_keys():
    assert warnings_of("teacher=cnn", "teacher.ensemble_seeds=[0,1]", "teacher.args.hidden=64") == []
    assert warnings_of("teacher.ensemble=[cnn,mlp]", "teacher.epochs=3", "teacher.optim.lr=0.01") == []


def test_a_teacher_beside_a_loss_without_teacher_term_is_unused():
    assert warnings_of("loss=ce", "teacher=resnet18", "teacher.epochs=2", reads_teacher=False) == [
        "teacher=resnet18: not used (loss=ce trains the student alone)",
        "teacher.epochs=2: not used (loss=ce trains the student alone)"]
    found = warnings_of("loss=kd", "loss.alpha=0", "loss.T=8", "teacher.epochs=3", reads_teacher=False)
    assert found == ["loss=kd: loss.alpha=0 leaves no teacher term: the student trains on the labels alone, as with "
                     "loss=ce (no KD)",
                     "loss.T=8: not used (loss.alpha=0 leaves no teacher term)",
                     "teacher.epochs=3: not used (loss=kd: loss.alpha=0 leaves no teacher term)"]


def test_semi_distils_its_unlabelled_images_whatever_the_losss_alpha():
    """mode=semi's pool term reads the teacher with the loss's T: alpha=0 leaves both in use."""
    assert warnings_of("mode=semi", "loss.alpha=0", "loss.T=8", "teacher.epochs=3", reads_teacher=False) == []


def test_a_dkd_warm_up_longer_than_training_is_warned_about():
    assert warnings_of("loss=dkd", "trainer.epochs=3") == [
        "loss.warmup=20 > trainer.epochs=3: the KD term's weight min(epoch/20, 1) never passes 3/20 = 0.15; set "
        "loss.warmup <= trainer.epochs (0: no warm-up)"]
    assert warnings_of("loss=dkd", "trainer.epochs=20") == [] and warnings_of("loss=dkd", "loss.warmup=0",
                                                                             "trainer.epochs=3") == []


def test_set_keys_reads_overrides_as_hydra_does():
    assert set_keys(["+a.b=1", "++c=2", "~d", "loss=ce", "e"]) == {"a.b": "+a.b=1", "c": "++c=2", "loss": "loss=ce"}


def _result(teacher_acc: float, baseline_acc: float, teacher_params: int, student_params: int) -> RunResult:
    return RunResult(
        teacher=TeacherResult(name="cnn", args={}, params=teacher_params, source="store", test_acc=teacher_acc),
        baseline=BaselineResult(name="mlp", store_dir="/b", reused=False, init={}, test_acc=baseline_acc),
        student=StudentResult(name="mlp", args={}, params=student_params, epochs=3, best_epoch=3, seed=0, init={},
                              test_acc_best=80.0))


def test_a_teacher_no_better_than_the_baseline_and_a_larger_student_are_warned_about():
    assert _result(79.0, 78.93, 100, 50).kd_warnings() == []
    teacher, larger = _result(78.87, 78.93, 100, 3900).kd_warnings()
    assert teacher.startswith("teacher: test accuracy 78.87% is no better than the CE-only baseline's 78.93%")
    assert larger.startswith("student mlp has 39.0× more parameters than teacher cnn (3,900 vs 100)")
    assert len(_result(78.93, 78.93, 100, 100).kd_warnings()) == 1  # equal accuracy: nothing to teach; equal size


@pytest.mark.parametrize("params_ratio, speedup, expected", [
    (9.8, 6.1, "student: 9.8× fewer params, 6.1× faster at batch 1, −0.9 pt"),
    (1 / 39, 0.5, "student: 39.0× more params, 2.0× slower at batch 1, −0.9 pt"),
    (1.02, 0.98, "student: as many params, as fast at batch 1, −0.9 pt"),
])
def test_compression_line_says_more_and_slower_for_a_larger_student(params_ratio, speedup, expected):
    entry = {"vs_teacher": {"params_ratio": params_ratio, "speedup_batch_1": speedup, "acc_delta_pt": -0.9}}
    assert compression.line("student", entry) == expected


def test_warnings_of_a_run_are_logged_and_in_its_summary(tmp_path):
    """Options the run ignores (a loss key, a teacher, a subset over the split's size) are warned about before
    training, in kdrun.log and summary.json; a completed run that cannot show KD after it."""
    run = tmp_path / "ce"
    summary = smoke_inproc(tmp_path, run, "loss=ce", "loss.T=8", "teacher=resnet18", "dataset.train_subset=100000",
                           "compression=false")
    expected = ["loss.T=8: not used (loss=ce has no teacher term)",
                "teacher=resnet18: not used (loss=ce trains the student alone)",
                "dataset.train_subset=100000: not used (the train split of digits holds 1,438 images, all kept)"]
    assert summary["status"] == "completed" and summary["warnings"] == expected
    assert read_json(run / "summary.json")["warnings"] == expected
    log = (run / "kdrun.log").read_text()
    assert all(log.index(w) < log.index("student epoch") for w in expected), log  # before anything trains

    run = tmp_path / "weak"  # a 2-unit teacher trained 1 epoch, distilled into a 256-unit student
    summary = smoke_inproc(tmp_path, run, "teacher=mlp", "teacher.args.hidden=2", "teacher.epochs=1",
                           "compression=false")
    kd = [w for w in summary["warnings"] if "baseline" in w or "parameters" in w]
    assert kd[0].startswith(f"teacher: test accuracy {summary['teacher']['test_acc']:.2f}% is no better than")
    assert kd[1].startswith("student mlp has ") and "more parameters than teacher mlp" in kd[1]
    assert all(w in (run / "kdrun.log").read_text() for w in kd)


def _job(sweep, name: str, overrides: list[str], warnings: list[str], teacher: float, baseline: float,
         student: float) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    summary = {"status": "completed", "teacher": {"test_acc": teacher, "val_acc": teacher},
               "baseline": {"test_acc": baseline, "val_acc": baseline},
               "student": {"test_acc_best": student, "val_acc_best": student, "test_acc_last": student},
               "delta_vs_baseline": student - baseline, "wall_time_s": 1.0}
    if warnings:
        summary["warnings"] = warnings
    (job / "summary.json").write_text(json.dumps(summary))


def test_sweep_summary_flags_the_cells_whose_jobs_carry_warnings(tmp_path):
    """results.csv's warnings column, cells.csv's warned count, summary.md's notes, grid marks and Warnings section,
    and the heat map's marks."""
    from kdrun.sweep import summarize

    sweep = tmp_path / "sweep"
    weak = "teacher: test accuracy 78.87% is no better than the CE-only baseline's 78.93%: ..."
    jobs = [("0", ["loss=kd", "trainer.epochs=3", "seed=0"], [], 95.0, 90.0, 92.0),
            ("1", ["loss=kd", "trainer.epochs=3", "seed=1"], [], 95.5, 90.5, 92.5),
            ("2", ["loss=dkd", "trainer.epochs=3", "seed=0"], ["loss.warmup=20 > trainer.epochs=3: ..."], 95.0, 90.0,
             91.0),
            ("3", ["loss=dkd", "trainer.epochs=3", "seed=1"], ["loss.warmup=20 > trainer.epochs=3: ..."], 95.5, 90.5,
             91.5),
            ("4", ["loss=kd", "trainer.epochs=30", "seed=0"], [weak], 78.87, 78.93, 79.0),
            ("5", ["loss=kd", "trainer.epochs=30", "seed=1"], [weak], 78.87, 78.93, 79.1),
            ("6", ["loss=dkd", "trainer.epochs=30", "seed=0"], [], 95.0, 90.0, 93.0),
            ("7", ["loss=dkd", "trainer.epochs=30", "seed=1"], [], 95.5, 90.5, 93.5)]
    for job in jobs:
        _job(sweep, *job)
    summarize(sweep, console=False)
    with open(sweep / "results.csv", newline="") as handle:
        rows = {r["job"]: r for r in csv.DictReader(handle)}
    assert [rows[j]["warnings"] for j in ("0", "2", "4")] == ["", "loss.warmup=20 > trainer.epochs=3: ...", weak]
    with open(sweep / "cells.csv", newline="") as handle:
        cells = {(c["loss"], c["trainer.epochs"]): c for c in csv.DictReader(handle)}
    assert [cells[k]["warned"] for k in (("kd", "3"), ("dkd", "3"), ("kd", "30"))] == ["0", "2", "2"]
    markdown = (sweep / "summary.md").read_text()
    rows = {line.split(" | ")[0].strip("| *") + "/" + line.split(" | ")[1].strip("*"): line
            for line in markdown.splitlines() if line.startswith(("| kd |", "| dkd |", "| **"))
            and line.count("|") > 10}
    assert "warned" not in rows["kd/3"] and "2 warned" in rows["dkd/3"]
    assert "teacher ≤ baseline" in rows["kd/30"] and "2 warned" in rows["kd/30"]
    assert "## Warnings" in markdown and f"| 4, 5 | {weak} |" in markdown
    assert "| 2, 3 | loss.warmup=20 > trainer.epochs=3: ... |" in markdown
    grid = markdown.split("## Grid")[1].split("##")[0]
    assert grid.count(" ! |") == 2 and "! = jobs with warnings" in grid
    assert (sweep / "results.png").stat().st_size > 0
