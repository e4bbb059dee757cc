"""How good each evaluated model is, class by class, and how well its confidence matches its accuracy.

Pure functions on a model's logits and the true labels of one split (no model, no files): per-class
precision, recall, F1 and support with macro and weighted averages and the confusion matrix (scikit-learn's
``classification_report`` and ``confusion_matrix``), the expected calibration error, and the classes where one
model trails another most. :mod:`kdrun.outputs.report` turns them into ``report.json``, figures and ``report.md``.

Expected calibration error (Guo et al. 2017), with ``n_bins`` (default 15) equal-width bins of the top-1
confidence ``c_i = max_k softmax(z_i)_k``; bin ``b`` holds the samples with ``b/n_bins < c_i <= (b+1)/n_bins``::

    ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|

where ``acc(B_b)`` is the fraction of bin ``b``'s samples whose top-1 class is right and ``conf(B_b)`` their mean
confidence. A fraction in [0, 1]; 0 is perfectly calibrated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

ECE_BINS = 15


@dataclass
class Prediction:
    """A model's logits on one split (``test``, else ``val`` when there is no test split) and its true labels."""

    split: str
    logits: "torch.Tensor"  # [N, K] float32, on the CPU
    labels: "torch.Tensor"  # [N] int64, on the CPU

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def agreement(teacher: Prediction, model: Prediction) -> Optional[dict]:
    """How much of its teacher's function a model learned, on the split both were scored on: ``top1``, the percent
    of images where their top-1 classes agree (right or wrong), and ``kl``, KL(p_teacher ‖ p_model) at T = 1 in
    nats, averaged over the images. None when the two were not scored on the same images."""
    if teacher.split != model.split or teacher.logits.shape != model.logits.shape:
        return None
    t = np.asarray(teacher.logits, dtype=np.float64)
    m = np.asarray(model.logits, dtype=np.float64)
    log_t = t - t.max(axis=1, keepdims=True)
    log_t -= np.log(np.exp(log_t).sum(axis=1, keepdims=True))
    log_m = m - m.max(axis=1, keepdims=True)
    log_m -= np.log(np.exp(log_m).sum(axis=1, keepdims=True))
    kl = float((np.exp(log_t) * (log_t - log_m)).sum(axis=1).mean()) if len(t) else None
    top1 = float(100.0 * (t.argmax(axis=1) == m.argmax(axis=1)).mean()) if len(t) else None
    return {"split": model.split, "top1": None if top1 is None else round(top1, 4),
            "kl": None if kl is None else round(kl, 6)}


def calibration(logits: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Expected calibration error of top-1 confidence (module docstring) and its reliability bins.

    Returns ``{"ece", "n_bins", "bins": [{"lower", "upper", "count", "accuracy", "confidence"}]}`` with a bin's
    accuracy and mean confidence None when it is empty.
    """
    probs = softmax(logits)
    labels = np.asarray(labels)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], conf, side="left")  # lower < c <= upper
    n, ece, bins = len(labels), 0.0, []
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        acc = float(correct[inside].mean()) if count else None
        mean_conf = float(conf[inside].mean()) if count else None
        if count:
            ece += count / n * abs(acc - mean_conf)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count, "accuracy": acc,
                     "confidence": mean_conf})
    return {"ece": ece if n else None, "n_bins": n_bins, "bins": bins}


def per_class(logits: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict:
    """scikit-learn's per-class report and confusion matrix over all ``len(names)`` classes.

    ``classes``: one entry per class (in class order) with ``precision``, ``recall``, ``f1``, ``support``
    (fractions in [0, 1]; 0 where undefined, e.g. precision of a class never predicted); ``macro_avg`` and
    ``weighted_avg`` (by support) of the same; ``confusion_matrix``: rows true class, columns predicted class.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    labels = np.asarray(labels)
    pred = np.asarray(logits).argmax(axis=1)
    order = list(range(len(names)))
    report = classification_report(labels, pred, labels=order, target_names=[str(n) for n in names],
                                   output_dict=True, zero_division=0)
    entry = lambda r: {"precision": r["precision"], "recall": r["recall"], "f1": r["f1-score"],  # noqa: E731
                       "support": int(r["support"])}
    return {"classes": [{"class": i, "name": str(name), **entry(report[str(name)])} for i, name in enumerate(names)],
            "macro_avg": entry(report["macro avg"]), "weighted_avg": entry(report["weighted avg"]),
            "confusion_matrix": confusion_matrix(labels, pred, labels=order).tolist()}


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, names: Sequence[str], n_bins: int = ECE_BINS) -> dict:
    """Everything the report says about one model: accuracy (percent), the per-class report, calibration."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    accuracy = round(100.0 * float((logits.argmax(axis=1) == labels).mean()), 4) if len(labels) else None
    return {"n": int(len(labels)), "accuracy": accuracy, **per_class(logits, labels, names),
            "calibration": calibration(logits, labels, n_bins)}


def trails(ahead: dict, behind: dict, k: int = 3) -> list[dict]:
    """The ``k`` classes where model ``behind`` trails model ``ahead`` most in per-class F1 (largest gap first),
    only classes where it does trail; gaps in percentage points (recall's too)."""
    rows = []
    for a, b in zip(ahead["classes"], behind["classes"]):
        gap = 100.0 * (a["f1"] - b["f1"])
        if gap > 0:
            rows.append({"class": a["class"], "name": a["name"], "support": a["support"], "f1_gap_pt": round(gap, 2),
                         "recall_gap_pt": round(100.0 * (a["recall"] - b["recall"]), 2),
                         "f1_ahead": a["f1"], "f1_behind": b["f1"], "recall_ahead": a["recall"],
                         "recall_behind": b["recall"]})
    rows.sort(key=lambda r: (-r["f1_gap_pt"], r["class"]))
    return rows[:k]


def describe_trails(rows: list[dict], ahead: str = "teacher", behind: str = "student") -> Optional[str]:
    """One line naming the classes of :func:`trails`, e.g. ``student trails teacher most on: 8 (F1 -12.3 pt, ...)``."""
    if not rows:
        return None
    parts = [f"{r['name']} (F1 -{r['f1_gap_pt']:.1f} pt, recall {0.0 - r['recall_gap_pt']:+.1f} pt)" for r in rows]
    return f"{behind} trails {ahead} most on: " + ", ".join(parts)
