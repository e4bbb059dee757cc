"""Typed stage results: the summary.json form (optional fields left out, nesting, the mode's own entries, the
run summary's key order)."""
from kdrun.results import (
    BaselineResult,
    LabelSplit,
    MergedTeacherResult,
    Row,
    RunResult,
    RunSummary,
    StudentResult,
    SubsetTeacher,
    TeacherResult,
)


def teacher(**kw):
    return TeacherResult(name="cnn", args={}, params=10, source="store", store_dir="/s/e", reused=True, epochs=2,
                         val_acc=90.0, test_acc=91.0, **kw)


def student(**kw):
    return StudentResult(name="mlp", args={}, params=5, epochs=2, best_epoch=2, seed=0, init={"source": "random"},
                         val_acc_last=80.0, test_acc_last=81.0, val_acc_best=82.0, test_acc_best=83.0, **kw)


def test_optional_fields_are_left_out_while_none():
    assert list(teacher().to_json()) == ["name", "args", "params", "source", "store_dir", "reused", "epochs",
                                         "val_acc", "test_acc"]
    ckpt = TeacherResult(name="cnn", args={}, params=10, source="ckpt", ckpt="/c.pt", ckpt_sha256="ab", reused=True)
    assert ckpt.to_json()["store_dir"] is None and "epochs" not in ckpt.to_json()  # None, but not optional
    assert teacher(cache={"used": True}).to_json()["cache"] == {"used": True}
    merged = MergedTeacherResult(name="m", combine="mean", class_splits=[[0, 1]], weights=None, source="store",
                                 reused=False)
    assert merged.to_json()["weights"] is None and merged.note == "trained"
    assert "generation" not in student().to_json() and student(generation=2).to_json()["generation"] == 2


def test_run_result_serialises_the_summary_parts():
    offline = RunResult()
    assert offline.to_json() == {"teacher": None, "baseline": None}  # a mode that has not finished a stage
    baseline = BaselineResult(name="mlp", store_dir="/b", reused=False, init={}, val_acc=70.0, test_acc=80.5)
    offline.teacher, offline.baseline, offline.student = teacher(), baseline, student()
    out = offline.to_json()
    assert list(out) == ["teacher", "baseline", "student"] and out["student"]["test_acc_best"] == 83.0
    assert offline.delta_vs_baseline() == 2.5
    merge = RunResult(rows=[Row("teacher 1", "cnn", 1.0, 2.0)], student_role="student, merged KD",
                      teachers=[SubsetTeacher(index=1, classes=[0, 1], seed=0, teacher=teacher())])
    out = merge.to_json()
    assert out["teachers"][0]["index"] == 1 and out["teachers"][0]["store_dir"] == "/s/e"
    assert out["rows"] == [{"role": "teacher 1", "name": "cnn", "val_acc": 1.0, "test_acc": 2.0, "note": ""}]
    assert out["student_role"] == "student, merged KD" and "student" not in out


def test_a_modes_entries_come_after_baseline_in_a_fixed_order():
    """Each mode sets its own entries (in the order it finishes them); summary.json lists them in one order."""
    semi = RunResult(rows=[], student=student())
    semi.rounds = [student()]
    semi.semi = LabelSplit(labeled=50, unlabeled=200, labeled_fraction_actual=0.2)
    out = semi.to_json()
    assert list(out) == ["teacher", "baseline", "semi", "rounds", "rows", "student"]
    assert out["semi"] == {"labeled": 50, "unlabeled": 200, "labeled_fraction_actual": 0.2}
    selfd = RunResult(generations=[student(generation=1)], ensemble={"val_acc": 1.0, "test_acc": 2.0})
    assert list(selfd.to_json()) == ["teacher", "baseline", "generations", "ensemble"]
    assert "predictions" not in RunResult().to_json() and "loss" not in RunResult().to_json()


def test_run_summary_splices_the_result_and_keeps_the_key_order():
    summary = RunSummary(status="running", out_dir="/r", mode="semi", seed=0, started_at="t", git_sha=None)
    assert summary.to_json() == {"status": "running", "out_dir": "/r", "mode": "semi", "seed": 0, "started_at": "t",
                                 "git_sha": None}  # git_sha: always there, null outside a checkout
    summary.loss = {"name": "kd", "formula": "configured"}
    summary.wall_time_s, summary.dataset = 1.5, {"name": "digits"}
    assert list(summary.to_json()) == ["status", "out_dir", "mode", "seed", "started_at", "git_sha", "loss",
                                       "dataset", "wall_time_s"]
    summary.result = RunResult(teacher=teacher(), student=student(), loss={"formula": "semi", "labelled_formula": "x"})
    summary.status, summary.error = "failed", "RuntimeError: boom"
    summary.warn("report: not written")
    out = summary.to_json()
    assert list(out) == ["status", "out_dir", "mode", "seed", "started_at", "git_sha", "loss", "dataset", "teacher",
                         "baseline", "student", "warnings", "error", "wall_time_s"]
    assert out["loss"] == {"name": "kd", "formula": "semi", "labelled_formula": "x"}  # the mode's changes win
    assert summary.loss == {"name": "kd", "formula": "configured"} and out["warnings"] == ["report: not written"]


def test_the_results_table_shows_a_teachers_parts_under_it_and_other_lines_after_the_baseline():
    from rich.console import Console

    from kdrun.results import BaselineResult, Row, RunResult, StudentResult, TeacherResult
    from kdrun.run import results_table

    teacher = TeacherResult(name="ensemble cnn+mlp", args={}, params=3, source="ensemble", val_acc=98.0, test_acc=97.0)
    student = StudentResult(name="mlp", args={}, params=1, epochs=2, best_epoch=2, seed=0, init={}, val_acc_best=95.0,
                            test_acc_best=94.0, val_acc_last=95.0, test_acc_last=94.0, select="best")
    baseline = BaselineResult(name="mlp", store_dir="b", reused=True, init={}, select="best", val_acc_best=93.0,
                              test_acc_best=92.0, val_acc=93.0, test_acc=92.0)
    rows = [Row("teacher 1 of 2", "cnn", 97.0, 96.0, of_teacher=True), Row("generation 1 (KD)", "mlp", 94.0, 93.0),
            Row("teacher 2 of 2", "mlp", 96.0, 95.0, of_teacher=True)]
    console = Console(width=200, record=True)
    console.print(results_table(RunResult(teacher=teacher, baseline=baseline, rows=rows, student=student)))
    roles = [line.split("│")[1].strip() for line in console.export_text().splitlines()
             if line.startswith("│") and line.split("│")[1].strip() not in ("", "role")]
    assert roles == ["teacher", "teacher 1 of 2", "teacher 2 of 2", "student, CE only", "generation 1 (KD)",
                     "student, KD"]
    assert "of_teacher" not in RunResult(rows=rows).to_json()["rows"][0]  # a table layout, not a summary.json key
