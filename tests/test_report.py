"""The run report: per-class metrics and ECE against hand computations, report.json / report.md / figures of
an in-process smoke run, a failed run's report of the stages that finished, and the sweep summary's links."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import read_json, smoke_inproc
from PIL import Image

from kdrun.outputs.metrics import Prediction, agreement, calibration, describe_trails, evaluate_logits, per_class, trails
from kdrun.outputs.report import write_report
from kdrun.results import BaselineResult, RunResult, RunSummary, TeacherResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def logits_of(probs) -> np.ndarray:
    """Logits whose softmax is ``probs`` (rows summing to 1)."""
    return np.log(np.asarray(probs, dtype=np.float64))


# --- agreement with the teacher ----------------------------------------------------------------------------------

def test_agreement_by_hand():
    """Top-1 agreement counts images where the two argmaxes match, right or wrong; KL(p_t ‖ p_m) at T = 1, mean."""
    p_t = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
    p_m = [[0.5, 0.25, 0.25], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]  # agrees on images 0 and 2, not 1
    labels = torch.tensor([1, 1, 1])  # whatever the truth
    teacher = Prediction("test", torch.tensor(logits_of(p_t) + 3.0), labels)  # softmax ignores a shift
    model = Prediction("test", torch.tensor(logits_of(p_m)), labels)
    found = agreement(teacher, model)
    kl = np.mean([sum(a * math.log(a / b) for a, b in zip(t, m)) for t, m in zip(p_t, p_m)])
    assert found == {"split": "test", "top1": pytest.approx(200 / 3, abs=1e-4), "kl": pytest.approx(kl, abs=1e-6)}
    assert agreement(teacher, teacher)["top1"] == 100.0 and agreement(teacher, teacher)["kl"] == pytest.approx(0)
    assert agreement(teacher, Prediction("val", model.logits, labels)) is None  # not the same images


# --- expected calibration error ----------------------------------------------------------------------------------

def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.7 (right), 0.55 (right); 15 bins of width 1/15:
    # 0.9 in bin 13 (0.867, 0.933]: 2 samples, acc 0.5, conf 0.9 -> 2/4 * 0.4  = 0.2
    # 0.7 in bin 10 (0.667, 0.733]: 1 sample,  acc 1,   conf 0.7 -> 1/4 * 0.3  = 0.075
    # 0.55 in bin 8 (0.533, 0.6]:   1 sample,  acc 1,   conf .55 -> 1/4 * 0.45 = 0.1125
    probs = [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.55, 0.45]]
    cal = calibration(logits_of(probs), np.array([0, 1, 1, 0]))
    assert cal["ece"] == pytest.approx(0.2 + 0.075 + 0.1125)
    assert cal["n_bins"] == 15 and len(cal["bins"]) == 15
    counts = {b: row["count"] for b, row in enumerate(cal["bins"]) if row["count"]}
    assert counts == {8: 1, 10: 1, 13: 2}
    assert cal["bins"][13]["accuracy"] == pytest.approx(0.5) and cal["bins"][13]["confidence"] == pytest.approx(0.9)
    assert cal["bins"][0]["accuracy"] is None and cal["bins"][0]["lower"] == 0.0
    assert cal["bins"][14]["upper"] == 1.0


def test_ece_extremes_and_bin_count():
    confident_right = np.array([[20.0, 0.0], [0.0, 20.0]])
    assert calibration(confident_right, np.array([0, 1]))["ece"] == pytest.approx(0.0, abs=1e-6)
    assert calibration(confident_right, np.array([1, 0]))["ece"] == pytest.approx(1.0, abs=1e-6)
    # 2 bins: confidences 0.6 and 0.8 share bin (0.5, 1]: |mean acc 0.5 - mean conf 0.7| = 0.2
    cal = calibration(logits_of([[0.6, 0.4], [0.2, 0.8]]), np.array([0, 0]), n_bins=2)
    assert cal["ece"] == pytest.approx(0.2) and [b["count"] for b in cal["bins"]] == [0, 2]


def test_ece_matches_a_reference_loop_on_random_logits():
    """Guo et al.'s reference form: for each bin, ``lower < conf <= upper``."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=gen) * 2
    labels = torch.randint(0, 7, (500,), generator=gen)
    conf, pred = logits.double().softmax(1).max(1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    ref = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ref += inside.double().mean() * (right[inside].mean() - conf[inside].mean()).abs()
    assert calibration(logits.numpy(), labels.numpy())["ece"] == pytest.approx(float(ref), abs=1e-9)


# --- per-class report ----------------------------------------------------------------------------------------------

def test_per_class_report_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0, 2])
    rep = per_class(np.eye(4)[pred], labels, ["a", "b", "c", "d"])  # class d: never true, never predicted
    assert rep["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    a, b, c, d = rep["classes"]
    assert (a["name"], a["class"], a["support"]) == ("a", 0, 2)
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (d["precision"], d["recall"], d["f1"], d["support"]) == (0, 0, 0, 0)
    # macro over all 4 classes (d counts as 0); weighted by support 2, 2, 3, 0
    assert rep["macro_avg"]["f1"] == pytest.approx((0.5 + 0.8 + 0.8 + 0) / 4)
    assert rep["weighted_avg"]["f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 3 * 0.8) / 7)
    assert rep["weighted_avg"]["support"] == 7
    full = evaluate_logits(np.eye(4)[pred], labels, ["a", "b", "c", "d"])
    assert full["accuracy"] == pytest.approx(100 * 5 / 7, abs=1e-3) and full["n"] == 7


def test_trails_names_the_worst_classes_by_f1_gap():
    def model(f1s, recalls):
        return {"classes": [{"class": i, "name": f"c{i}", "support": 10, "f1": f, "recall": r, "precision": f}
                            for i, (f, r) in enumerate(zip(f1s, recalls))]}
    teacher = model([0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6, 0.5])
    student = model([0.95, 0.5, 0.6, 0.2, 0.5], [0.9, 0.6, 0.7, 0.1, 0.5])
    worst = trails(teacher, student)
    assert [w["name"] for w in worst] == ["c3", "c1", "c2"]
    assert [w["f1_gap_pt"] for w in worst] == pytest.approx([40.0, 30.0, 10.0])
    assert [w["recall_gap_pt"] for w in worst] == pytest.approx([50.0, 20.0, 0.0])
    assert describe_trails(worst).startswith("student trails teacher most on: c3 (F1 -40.0 pt, recall -50.0 pt)")
    assert trails(student, student) == [] and describe_trails([]) is None


# --- the report of a run ---------------------------------------------------------------------------------------

def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()


def test_smoke_run_writes_the_report(tmp_path):
    run_dir = tmp_path / "run"
    summary = smoke_inproc(tmp_path, run_dir, "trainer.num_threads=1", "report=true")
    report = read_json(run_dir / "report.json")
    assert list(report["models"]) == ["teacher", "baseline", "student"]
    assert report["split"] == "test" and report["num_classes"] == 10 and report["ece_bins"] == 15
    for role, model in report["models"].items():
        assert len(model["classes"]) == 10 and model["n"] == summary["dataset"]["test"]
        assert {"precision", "recall", "f1", "support"} <= set(model["classes"][0])
        assert sum(c["support"] for c in model["classes"]) == model["n"]
        assert np.asarray(model["confusion_matrix"]).sum() == model["n"]
        assert 0 <= model["calibration"]["ece"] <= 1
        acc = summary[role]["test_acc_best" if role == "student" else "test_acc"]
        assert model["accuracy"] == pytest.approx(acc, abs=1e-3)  # the same logits as the summary's accuracy
        assert summary["report"]["models"][role]["ece"] == pytest.approx(model["calibration"]["ece"], abs=1e-4)
        assert summary["report"]["models"][role]["macro_f1"] == pytest.approx(model["macro_avg"]["f1"], abs=1e-4)
    assert set(report["figures"]) == {"confusion_teacher", "confusion_baseline", "confusion_student", "reliability",
                                      "learning_curves"}
    text = (run_dir / "report.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(report["figures"].values())
    for link in links:
        assert_png(run_dir / link)
    assert "## Where the student trails the teacher" in text and "ECE = Σ_b (|B_b| / n)" in text
    for role in ("student", "baseline"):  # agreement with the teacher, in the summary, the report and report.md
        assert summary[role]["agreement"] == report["models"][role]["agreement"]
        assert summary["report"]["models"][role]["agreement"] == summary[role]["agreement"]
        assert 0 <= summary[role]["agreement"]["top1"] <= 100 and summary[role]["agreement"]["kl"] >= 0
    assert "agreement" not in report["models"]["teacher"]
    assert f"| {summary['student']['agreement']['top1']:.2f} |" in text and "KL(teacher ‖ model)" in text
    worst = report["student_trails_teacher"]
    assert len(worst) <= 3 and all(w["f1_gap_pt"] > 0 for w in worst)
    if worst:  # named under the final table, which is also in the log
        assert f"student trails teacher most on: {worst[0]['name']} " in (run_dir / "kdrun.log").read_text()


def test_failed_run_reports_the_models_that_finished(tmp_path):
    """The baseline diverges (optim.lr is the student's): the report shows the teacher, which finished."""
    run_dir = tmp_path / "run"
    with pytest.raises(Exception):
        smoke_inproc(tmp_path, run_dir, "trainer.num_threads=1", "optim.lr=1e12", "report=true")
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and list(summary["report"]["models"]) == ["teacher"]
    assert "did not complete" in (run_dir / "report.md").read_text()
    assert_png(run_dir / "figures" / "confusion_teacher.png")


def test_report_of_a_mode_with_more_stages(tmp_path):
    """Generations / rounds are reported between baseline and student; a class-subset teacher (fewer classes) is
    left out; the teacher's and baseline's curves come from their store entries' metrics.jsonl."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40,), generator=gen)
    result = RunResult()
    for role, classes in (("teacher", 2), ("student", 3), ("gen1", 3), ("baseline", 3)):
        result.predictions[role] = Prediction("test", torch.randn(40, classes, generator=gen), labels)
    store = tmp_path / "entry"
    store.mkdir()
    (store / "metrics.jsonl").write_text('{"stage": "baseline", "epoch": 1, "train/loss": 1.0, "val/acc": 50.0}\n')
    result.baseline = BaselineResult(name="mlp", store_dir=str(store), reused=True, init={})
    result.teacher = TeacherResult(name="cnn", args={}, params=1, source="ckpt")  # no epochs to plot
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(
        f'{{"stage": "{s}", "epoch": {e}, "train/loss": 1.0, "train/loss_kd": 0.5, "train/loss_ce": 0.9, '
        f'"val/acc": null}}\n' for s in ("gen1", "student") for e in (1, 2)))
    written = write_report(run_dir, result, "fashion_mnist", "self")
    report = read_json(run_dir / "report.json")
    assert list(report["models"]) == ["baseline", "gen1", "student"]
    assert report["student_trails_teacher"] is None and written.trails_line is None
    assert report["class_names"] == [str(i) for i in range(3)]  # a dataset called fashion_mnist names nothing
    assert_png(run_dir / report["figures"]["learning_curves"])
    assert "## Where the student trails" not in (run_dir / "report.md").read_text()
    assert math.isclose(written.summary["models"]["gen1"]["accuracy"], report["models"]["gen1"]["accuracy"])


def test_class_names_are_the_loaded_datasets():
    """The names the loaded dataset gave (never looked up by the dataset's name), else the class indices."""
    from kdrun.outputs.report import class_names

    assert class_names(["cat", "dog", "owl"], 3) == ["cat", "dog", "owl"]
    assert class_names(None, 3) == ["0", "1", "2"]
    assert class_names(["cat", "dog", "owl"], 2) == ["0", "1"]  # a class-subset model (mode=merge) is left out


def test_sweep_summary_links_each_jobs_report(seed_sweep):
    base, _ = seed_sweep
    sweep_dir = base / "sweep"
    text = (sweep_dir / "summary.md").read_text()
    links = re.findall(r"\[report\.md\]\(([^)]+)\)", text)
    jobs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert len(links) == len(jobs) == 4
    assert sorted(sweep_dir / link for link in links) == sorted(job / "report.md" for job in jobs)
    assert all((sweep_dir / link).is_file() for link in links)


def test_report_false_writes_no_report(tmp_path):
    from types import SimpleNamespace

    from kdrun.run import _report

    result = RunResult()
    result.predictions["student"] = Prediction("test", torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))
    conf = SimpleNamespace(report=False, dataset=SimpleNamespace(name="digits"), mode=SimpleNamespace(name="offline"))
    summary = RunSummary(status="running", out_dir=str(tmp_path), mode="offline", seed=0, started_at="", git_sha=None)
    empty = summary.to_json()
    assert _report(conf, result, tmp_path, summary) is None
    assert summary.to_json() == empty and not (tmp_path / "report.json").exists()
    conf.report = True
    assert _report(conf, result, tmp_path, summary) is None  # no teacher: nothing to compare the student with
    assert list(summary.to_json()["report"]["models"]) == ["student"] and (tmp_path / "report.md").is_file()


def test_a_later_job_reuses_the_teachers_evaluation(tmp_path, monkeypatch):
    """The jobs of a sweep share one process and one teacher: its logits on val and test are computed by the
    first job only, and every job reports the same teacher figures."""
    from kdrun.memo import MEMO, Last
    from kdrun.stages import common as stages

    calls = []
    evaluate = stages.evaluate
    monkeypatch.setattr(MEMO, "frozen_scores", Last())  # an earlier test's run may have evaluated the same teacher
    monkeypatch.setattr(stages, "evaluate", lambda model, data, ctx, role=None:
                        calls.append(role) or evaluate(model, data, ctx, role))
    first = smoke_inproc(tmp_path, tmp_path / "a", "baseline=false", "loss.T=2", "report=true")
    second = smoke_inproc(tmp_path, tmp_path / "b", "baseline=false", "loss.T=3", "report=true")
    assert calls.count("teacher") == 1 and second["teacher"]["reused"] is True
    assert first["teacher"]["test_acc"] == second["teacher"]["test_acc"]
    a, b = read_json(tmp_path / "a" / "report.json"), read_json(tmp_path / "b" / "report.json")
    assert a["models"]["teacher"] == b["models"]["teacher"]


# --- figures a reader looks at -----------------------------------------------------------------------------------

def drawn_figures(monkeypatch) -> dict:
    """name -> the matplotlib figure the report saves as ``figures/<name>.png``."""
    from kdrun.outputs import report

    figures, save = {}, report._save
    monkeypatch.setattr(report, "_save", lambda fig, out_dir, name: figures.setdefault(name, fig) and
                        save(fig, out_dir, name))
    return figures


def test_reliability_diagram_leaves_sparse_bins_out_of_its_line(tmp_path, monkeypatch):
    """A small test split's bins of 1-3 images zig-zag between accuracy 0 and 1: they are drawn hollow, apart
    from the line; report.json keeps every bin (ECE counts them)."""
    from kdrun.outputs.report import MIN_BIN_COUNT, reliability_png

    figures = drawn_figures(monkeypatch)
    probs = [[0.95, 0.05]] * 40 + [[0.5, 0.5]] * 2 + [[0.3, 0.7]] * 3  # bins of 40, 2 and 3 images
    labels = np.array([0] * 38 + [1] * 2 + [1] * 2 + [1] * 3)
    model = evaluate_logits(logits_of(probs), labels, ["a", "b"])
    assert sorted(b["count"] for b in model["calibration"]["bins"] if b["count"]) == [2, 3, 40]
    (tmp_path / "figures").mkdir()
    reliability_png(tmp_path, {"student": model})
    top = figures["reliability"].axes[0]
    (line,) = [ln for ln in top.get_lines() if "ECE" in ln.get_label()]
    assert list(line.get_xdata()) == pytest.approx([0.95])  # the two sparse bins are not joined to it
    hollow = [c for c in top.collections if len(c.get_offsets()) and not c.get_facecolor().any()]
    assert sorted(x for c in hollow for x, _ in c.get_offsets()) == pytest.approx([0.5, 0.7])
    assert f"< {MIN_BIN_COUNT} images" in top.get_title()
    assert_png(tmp_path / "figures" / "reliability.png")


def test_learning_curves_show_each_loss_family_on_a_log_scale(tmp_path, monkeypatch):
    """A KD student's total loss (16 at epoch 1) flattened every CE curve on one linear axis: the CE with the
    labels of every stage (a KD stage's CE part) has a panel of its own, the KD losses another, both log scale."""
    from kdrun.outputs.report import curves_png

    figures = drawn_figures(monkeypatch)
    ce = [{"epoch": e, "train/loss": v, "train/loss_ce": v, "train/loss_kd": 0.0, "val/acc": 90.0 + e}
          for e, v in ((1, 1.8), (2, 0.3), (3, 0.05))]
    kd = [{"epoch": e, "train/loss": t, "train/loss_ce": c, "train/loss_kd": t, "val/acc": 80.0 + e}
          for e, t, c in ((1, 16.0, 1.9), (2, 2.0, 0.4), (3, 0.3, 0.08))]
    (tmp_path / "figures").mkdir()
    curves_png(tmp_path, {"teacher": ce, "student": kd})
    ce_ax, kd_ax, acc_ax = figures["learning_curves"].axes
    assert ce_ax.get_yscale() == kd_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    plotted = {ln.get_label(): list(ln.get_ydata()) for ln in ce_ax.get_lines()}
    assert plotted == {"teacher": [1.8, 0.3, 0.05], "student": [1.9, 0.4, 0.08]}  # the student's CE part
    assert [list(ln.get_ydata()) for ln in kd_ax.get_lines()] == [[16.0, 2.0, 0.3]]
    assert len(acc_ax.get_lines()) == 2
    curves_png(tmp_path, {"teacher": ce})  # no KD stage: no KD panel
    assert len(figures["learning_curves"].axes) == 3  # the first figure drawn is kept; draw again to compare
    figures.clear()
    curves_png(tmp_path, {"teacher": ce})
    assert len(figures["learning_curves"].axes) == 2


def sweep_cell(params: dict, delta: float, p_value: float, best: bool = False):
    from kdrun.sweep.jobs import NOISE_P, Cell

    stats = {"n": 3, "jobs": 3, "failed": 0, "test_mean": 97.0 + delta, "test_std": 0.3, "val_mean": 97.0 + delta,
             "delta_mean": delta, "p_value": p_value, "within_noise": p_value >= NOISE_P, "baseline_mean": 97.0,
             "teacher_mean": 99.0}
    return Cell(params, [], stats, best)


def test_sweep_heat_map_marks_a_significant_loss_apart_from_a_gain_and_fits_its_text(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from kdrun.sweep import plot
    from kdrun.sweep.jobs import SweepSummary
    from kdrun.sweep.report import grid

    cells = [sweep_cell({"loss.T": 4, "loss.alpha": 0.9}, +1.5, 0.01, best=True),
             sweep_cell({"loss.T": 8, "loss.alpha": 0.9}, -1.5, 0.01),
             sweep_cell({"loss.T": 1, "loss.alpha": 0.9}, +0.2, 0.6)]
    summary = SweepSummary(tmp_path, ["loss.T", "loss.alpha", "seed"], ["loss.T", "loss.alpha"], [], cells)
    drawn, savefig = [], Figure.savefig

    def texts(fig):
        """Every visible text of ``fig`` and where it lands, drawn at the figure's own size and dpi."""
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        return fig.bbox.frozen(), [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
                                   if t.get_visible() and t.get_text().strip()]

    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(texts(fig)) or savefig(fig, *a, **k))
    plot.heatmap(summary, grid(summary), tmp_path / "results.png")
    ((box, placed),) = drawn
    cells = {text.splitlines()[0]: text for text, _ in placed if text.startswith("9")}
    assert cells["98.50"].endswith("+1.50 ▲") and cells["95.50"].endswith("-1.50 ▼")
    assert cells["97.20"].endswith("+0.20 ~")
    assert any("▼ significant loss" in text for text, _ in placed)  # the legend line says which is which
    for text, extent in placed:  # nothing clipped: a one-column grid cut its title's lines
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and extent.y1 <= box.y1 + 1, text
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC
