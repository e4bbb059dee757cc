"""The run's report: ``report.json``, ``report.md`` and the figures under ``figures/``, from the predictions of
every evaluated model (:attr:`kdrun.results.RunResult.predictions`) and the per-epoch metrics.

``report.json``: per model (teacher, CE baseline, earlier stages such as generations or rounds, student), the
accuracy, scikit-learn's per-class report with macro and weighted averages, the confusion matrix and the
calibration bins (:mod:`kdrun.outputs.metrics`), plus the classes where the student trails the teacher most.
Figures (matplotlib, Agg, no pyplot): ``confusion_<role>.png`` per model, ``reliability.png`` (all models),
``learning_curves.png`` (train loss and val accuracy per epoch; the teacher's, baseline's and assistant's epochs come
from their store entries' ``metrics.jsonl``). ``report.md`` puts the tables and figures together (relative
links: it reads on GitHub and in any Markdown viewer).
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kdrun.outputs.metrics import ECE_BINS, agreement, describe_trails, evaluate_logits, trails
from kdrun.records import atomic_write_bytes, atomic_write_text, read_jsonl, write_json
from kdrun.results import RunResult

log = logging.getLogger("kdrun")
FIGURES = "figures"
COLOURS = {"teacher": "tab:blue", "baseline": "tab:gray", "student": "tab:red", "assistant": "tab:green"}
MIN_BIN_COUNT = 20  # reliability.png: a bin with fewer samples (accuracy's std error > 0.1) is hollow, not joined


@dataclass
class Written:
    """What :func:`write_report` wrote: ``summary`` (the pointer for ``summary.json``) and the line naming the
    classes where the student trails the teacher most (None without both)."""

    summary: dict
    trails_line: Optional[str]


def class_names(names: Optional[list[str]], num_classes: int) -> list[str]:
    """The class names the loaded dataset gave (:attr:`kdrun.data.dataset.Data.class_names`) when they name
    ``num_classes`` classes, else the class indices."""
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def label(role: str) -> str:
    return {"baseline": "baseline (CE)", "assistant": "assistant (teaches the student)"}.get(role, role)


def _ordered(predictions: dict) -> list[str]:
    """Teacher, baseline, the mode's other stages in the order they finished, student last."""
    first = [r for r in ("teacher", "baseline") if r in predictions]
    return first + [r for r in predictions if r not in (*first, "student")] + ["student"] * ("student" in predictions)


def write_report(out_dir: Path, result: RunResult, dataset: str, mode: str, note: str = "",
                 names: Optional[list[str]] = None) -> Optional[Written]:
    """Write ``report.json``, ``report.md`` and ``figures/*.png`` into ``out_dir`` for the models in
    ``result.predictions`` (None, nothing written, when there are none). ``note``: a line for the top of
    ``report.md`` (e.g. that the run failed and only the finished stages are shown); ``names``: the loaded
    dataset's class names (None: the class indices)."""
    t0 = time.perf_counter()
    preds = result.predictions
    if not preds:
        return None
    num_classes = max(p.num_classes for p in preds.values())  # a class-subset teacher (mode=merge) is left out
    roles = [r for r in _ordered(preds) if preds[r].num_classes == num_classes]
    peers = _peers(result)
    names = class_names(names, num_classes)
    models = {}
    for role in roles:
        p = preds[role]
        models[role] = {"split": p.split, **evaluate_logits(p.logits.numpy(), p.labels.numpy(), names)}
        if role != "teacher" and "teacher" in preds:  # did it learn the teacher's function (kdrun.outputs.metrics)
            models[role]["agreement"] = agreement(preds["teacher"], p)
        elif getattr(peers.get(role), "agreement", None):  # mode=online: with the other peers' ensemble
            models[role]["agreement"] = peers[role].agreement
    worst = trails(models["teacher"], models["student"]) if {"teacher", "student"} <= set(models) else None
    curves = learning_curves(out_dir, result, roles)
    (out_dir / FIGURES).mkdir(exist_ok=True)
    figures = {f"confusion_{role}": confusion_png(out_dir, role, models[role], names) for role in roles}
    figures["reliability"] = reliability_png(out_dir, models)
    if curves:
        figures["learning_curves"] = curves_png(out_dir, curves)
    report = {"dataset": dataset, "mode": mode, "split": preds[roles[0]].split, "num_classes": num_classes,
              "class_names": names, "ece_bins": ECE_BINS, "models": models, "student_trails_teacher": worst,
              "figures": figures}
    write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown(report, result, note))
    line = describe_trails(worst) if worst is not None else None
    log.info(f"report: report.md, report.json and {len(figures)} figures in {time.perf_counter() - t0:.2f}s")
    summary = {"md": "report.md", "json": "report.json", "split": report["split"],
               "models": {r: {"accuracy": m["accuracy"], "macro_f1": round(m["macro_avg"]["f1"], 4),
                              "ece": _round(m["calibration"]["ece"]),
                              **({"agreement": m["agreement"]} if m.get("agreement") else {})}
                          for r, m in models.items()}}
    if worst is not None:
        summary["student_trails_teacher"] = [{"class": w["name"], "f1_gap_pt": w["f1_gap_pt"]} for w in worst]
    return Written(summary, line)


def _peers(result: RunResult) -> dict:
    """mode=online: each peer's result by its role in ``predictions`` (``student`` for peer 1, ``peer<k>``)."""
    return {("student" if p.peer == 1 else f"peer{p.peer}"): p for p in result.peers or []}


def _round(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(value, digits)


def learning_curves(out_dir: Path, result: RunResult, roles: list[str]) -> dict:
    """role -> the per-epoch records of its training (deduplicated by epoch, the last line wins): the teacher's,
    baseline's and assistant's (mode=assistant) from their store entries, the others' from the run's
    ``metrics.jsonl`` (by ``stage``)."""
    sources = {"teacher": getattr(result.teacher, "store_dir", None),
               "baseline": getattr(result.baseline, "store_dir", None)}
    if result.assistant is not None:  # mode=assistant: its entry holds every epoch, also when this run reused it
        sources["assistant"] = result.assistant.store_dir
    curves = {}
    for role in roles:
        if role in sources and not sources[role]:  # a teacher from teacher.ckpt, a snapshot or merged one: no epochs
            continue
        path = Path(sources[role]) / "metrics.jsonl" if role in sources else out_dir / "metrics.jsonl"
        records = {}
        for record in read_jsonl(path):
            if record.get("stage") == role and "epoch" in record:
                records[record["epoch"]] = record
        if records:
            curves[role] = [records[e] for e in sorted(records)]
    return curves


def _figure(width: float, height: float, margins: dict, cols: int = 1, rows: int = 1):
    """A figure without pyplot (no global state, Agg when saved) and fixed margins (a layout engine would
    double the time a report takes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(**margins)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, out_dir: Path, name: str) -> str:
    """Save ``fig`` as ``figures/<name>.png`` atomically; return its path relative to ``out_dir``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    atomic_write_bytes(out_dir / FIGURES / f"{name}.png", buffer.getvalue())
    return f"{FIGURES}/{name}.png"


def confusion_png(out_dir: Path, role: str, model: dict, names: list[str]) -> str:
    """Counts, coloured by the fraction of the true class (row); numbers and class names up to 20 classes."""
    import numpy as np

    cm = np.asarray(model["confusion_matrix"], dtype=float)
    k = len(names)
    size, long = min(12.0, max(3.5, 0.35 * k + 1.5)), max(map(len, names)) > 2 and k <= 20
    margin = 1.1 if long else 0.6  # inches for the tick labels
    fig, axes = _figure(size + margin, size + margin, dict(left=(margin + 0.2) / (size + margin), bottom=(margin + 0.2) /
                                                          (size + margin), right=0.97, top=1 - 0.45 / (size + margin)))
    ax = axes[0][0]
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), names, rotation=45 if long else 0, ha="right" if long else "center", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{label(role)}: {model['split']} accuracy {model['accuracy']:.2f}%", fontsize=10)
    return _save(fig, out_dir, f"confusion_{role}")


def reliability_png(out_dir: Path, models: dict) -> str:
    """Accuracy against mean confidence per bin (the diagonal is perfect calibration) and the share of samples
    per bin, one line per model. A bin of fewer than :data:`MIN_BIN_COUNT` samples is a hollow marker, left out
    of the line: its accuracy is too noisy to read (a small test split zig-zags between 0 and 1). ECE itself is
    unchanged (every bin counts, by its share)."""
    fig, axes = _figure(5.5, 7, dict(left=0.16, right=0.97, bottom=0.07, top=0.93, hspace=0.32), rows=2)
    top, bottom = axes[0][0], axes[1][0]
    top.plot([0, 1], [0, 1], ls="--", color="black", lw=0.8, label="perfect calibration")
    sparse = False
    for role, model in models.items():
        cal = model["calibration"]
        full = [b for b in cal["bins"] if b["count"]]
        colour = COLOURS.get(role)
        n = max(1, model["n"])
        solid = [b for b in full if b["count"] >= MIN_BIN_COUNT]
        few = [b for b in full if b["count"] < MIN_BIN_COUNT]
        sparse = sparse or bool(few)
        (drawn,) = top.plot([b["confidence"] for b in solid], [b["accuracy"] for b in solid], color=colour, lw=1.2,
                            alpha=0.8, label=f"{label(role)} (ECE {cal['ece']:.3f})")
        colour = drawn.get_color()  # a stage without a colour of its own (gen1, ...) keeps the one it got
        top.scatter([b["confidence"] for b in solid], [b["accuracy"] for b in solid], color=colour,
                    s=[8 + 150 * b["count"] / n for b in solid])  # area: the bin's share
        top.scatter([b["confidence"] for b in few], [b["accuracy"] for b in few], s=14, facecolors="none",
                    edgecolors=colour, linewidths=0.8, alpha=0.7)
        bottom.plot([(b["lower"] + b["upper"]) / 2 for b in full], [b["count"] / n for b in full], marker=".",
                    color=colour)
    if sparse:
        top.scatter([], [], s=14, facecolors="none", edgecolors="grey", label=f"bin of < {MIN_BIN_COUNT} images")
    top.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="mean top-1 confidence in bin", ylabel="accuracy in bin")
    top.set_title(f"reliability: {ECE_BINS} equal-width confidence bins; marker area: share of samples;\n"
                  f"hollow: a bin of < {MIN_BIN_COUNT} images (too few to read), not joined", fontsize=9)
    top.legend(fontsize=8, loc="best")
    bottom.set(xlim=(0, 1), yscale="log", xlabel="top-1 confidence", ylabel="share of samples (log)")
    return _save(fig, out_dir, "reliability")


def _ce_part(record: dict) -> Optional[float]:
    """The cross-entropy with the train labels of an epoch: a KD stage's CE part, a CE stage's loss."""
    return record.get("train/loss_ce", record.get("train/loss"))


def _distils(records: list[dict]) -> bool:
    """Whether a stage's loss is more than its CE part (a KD, feature or relation loss)."""
    return any(r.get("train/loss") is not None and r.get("train/loss_ce") is not None
               and abs(r["train/loss"] - r["train/loss_ce"]) > 1e-6 * max(1.0, abs(r["train/loss_ce"]))
               for r in records)


def curves_png(out_dir: Path, curves: dict) -> str:
    """Per epoch, one line per model: the cross-entropy with the train labels (every stage's, comparable: a KD
    stage's CE part), each KD stage's own total loss (a different objective per loss, so a panel of its own) and
    val accuracy. Losses on a log scale: they fall by orders of magnitude."""
    from matplotlib.ticker import MaxNLocator

    kd = [role for role, records in curves.items() if _distils(records)]
    fig, axes = _figure(5 * (2 + bool(kd)), 4, dict(left=0.06, right=0.98, bottom=0.13, top=0.9, wspace=0.25),
                        cols=2 + bool(kd))
    ce_ax, acc_ax, kd_ax = axes[0][0], axes[0][-1], axes[0][1] if kd else None
    for role, records in curves.items():
        epochs = [r["epoch"] for r in records]
        colour = COLOURS.get(role)
        (drawn,) = ce_ax.plot(epochs, [_ce_part(r) for r in records], marker=".", color=colour, label=label(role),
                              ls="--" if role in kd else "-")
        colour = drawn.get_color()
        if role in kd:
            kd_ax.plot(epochs, [r.get("train/loss") for r in records], marker=".", color=colour, label=label(role))
        if any(r.get("val/acc") is not None for r in records):
            acc_ax.plot(epochs, [r.get("val/acc") for r in records], marker=".", color=colour, label=label(role))
    ce_ax.set(xlabel="epoch", ylabel="cross-entropy (log)", yscale="log",
              title="CE with the train labels\n(dashed: a KD stage's CE part)")
    if kd_ax is not None:
        kd_ax.set(xlabel="epoch", ylabel="train loss (log)", yscale="log",
                  title="each KD stage's total loss\n(its own objective: not comparable with CE)")
    acc_ax.set(xlabel="epoch", ylabel="val accuracy %", title="val accuracy")
    for ax in axes[0]:
        ax.title.set_fontsize(10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[1]:  # no val split: the accuracy panel has no curve
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    return _save(fig, out_dir, "learning_curves")


def _f(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict, result: RunResult, note: str = "") -> str:
    """``report.md``: accuracy summary, the student's worst classes, calibration, per-class table, figures."""
    models, figures = report["models"], report["figures"]
    names = {"teacher": getattr(result.teacher, "name", ""), "baseline": getattr(result.baseline, "name", ""),
             "student": getattr(result.student, "name", ""), "assistant": getattr(result.assistant, "name", ""),
             **{r: p.name for r, p in _peers(result).items()},
             **{f"teacher {t.index}": t.teacher.name for t in result.teachers or ()}}  # an ensemble's members
    split, n = report["split"], next(iter(models.values()))["n"]
    rule = getattr(result.student, "select", "best")
    which = "the best-on-val checkpoint" if rule == "best" else "the last epoch's checkpoint (the teacher's: best on val)"
    lines = ["# kdrun run report", "", f"mode `{report['mode']}`, dataset `{report['dataset']}` "
             f"({report['num_classes']} classes); every number is on the **{split}** split ({n} images), "
             f"of {which}: `trainer.select={rule}`.", ""]
    if note:
        lines += [f"> {note}", ""]
    if (helper := result.assistant) is not None:  # mode=assistant: say who taught whom
        lines += [f"Teacher → assistant → student: the assistant `{helper.name}` ({helper.params:,} parameters, "
                  f"{'reused from' if helper.reused else 'trained into'} the teacher store, {helper.epochs} epochs) "
                  f"was distilled from the teacher and taught the student; agreement is with the teacher.", ""]
    agrees = any(m.get("agreement") for m in models.values())
    peers = any((m.get("agreement") or {}).get("with") for m in models.values())  # mode=online
    target = "the other peers" if peers else "teacher"
    lines += ["## Summary", "", "| model | role | accuracy % | macro F1 | weighted F1 | ECE |"
              + (f" agrees with {target} % | KL({'others' if peers else 'teacher'} ‖ model) |" if agrees else ""),
              "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if agrees else "")]
    for role, m in models.items():
        row = (f"| {names.get(role, '')} | {label(role)} | {_f(m['accuracy'], 2)} | {_f(m['macro_avg']['f1'])} | "
               f"{_f(m['weighted_avg']['f1'])} | {_f(m['calibration']['ece'])} |")
        if agrees:
            a = m.get("agreement") or {}
            row += f" {_f(a.get('top1'), 2)} | {_f(a.get('kl'))} |"
        lines.append(row)
    lines += ["", "Precision, recall and F1 are fractions (scikit-learn's `classification_report`); macro: the mean "
              "over classes, weighted: by support."
              + (" Agreement: the share of images where the model's top-1 class is the teacher's (right or "
                 "wrong); KL(teacher ‖ model): at T = 1, in nats, averaged over the images. Both ask whether the "
                 "model learned the teacher's function, which accuracy alone does not show." if agrees and not peers
                 else "")
              + (" Agreement: the share of images where the peer's top-1 class is that of the other peers' "
                 "ensemble (their mean softmax; right or wrong); KL(others ‖ model): at T = 1, in nats, averaged over "
                 "the images. Both ask how far mutual learning made the peers one function." if peers else ""), ""]
    worst = report["student_trails_teacher"]
    if worst is not None:
        lines += ["## Where the student trails the teacher", ""]
        if worst:
            lines += ["| class | support | teacher F1 | student F1 | Δ F1 (pt) | teacher recall | student recall | "
                      "Δ recall (pt) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {w['name']} | {w['support']} | {_f(w['f1_ahead'])} | {_f(w['f1_behind'])} | "
                      f"{-w['f1_gap_pt']:+.1f} | {_f(w['recall_ahead'])} | {_f(w['recall_behind'])} | "
                      f"{0.0 - w['recall_gap_pt']:+.1f} |" for w in worst]
        else:
            lines.append("The student's F1 is at least the teacher's on every class.")
        lines.append("")
    lines += ["## Calibration", "", f"Expected calibration error: ECE = Σ_b (|B_b| / n) · |acc(B_b) − conf(B_b)| over "
              f"{report['ece_bins']} equal-width bins of the top-1 softmax confidence (bin b holds "
              f"b/{report['ece_bins']} < confidence ≤ (b+1)/{report['ece_bins']}); 0 is perfectly calibrated.", "",
              f"![reliability diagram]({figures['reliability']})", ""]
    if "learning_curves" in figures:
        lines += ["## Learning curves", "", f"![learning curves]({figures['learning_curves']})", ""]
    lines += ["## Per-class precision / recall / F1", ""]
    header = ["class", "support", *(label(r) for r in models)]
    lines += ["| " + " | ".join(header) + " |", "| --- | ---: |" + " --- |" * len(models)]
    first = next(iter(models.values()))
    for i, cls in enumerate(first["classes"]):
        cells = [f"{_f(m['classes'][i]['precision'], 2)} / {_f(m['classes'][i]['recall'], 2)} / "
                 f"{_f(m['classes'][i]['f1'], 2)}" for m in models.values()]
        lines.append(f"| {cls['name']} | {cls['support']} | " + " | ".join(cells) + " |")
    lines += ["", "## Confusion matrices", "", "Rows: true class, columns: predicted class; colour: share of the "
              "true class.", ""]
    lines += [f"![{label(role)}]({figures[f'confusion_{role}']})" for role in models]
    return "\n".join(lines) + "\n"
