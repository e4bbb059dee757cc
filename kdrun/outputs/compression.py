"""The compression report (``compression=true``, default): what the student saves against its teacher.

For the teacher, the student (``checkpoints/student_best.pt``; ``student_last.pt`` under ``trainer.select=last``)
and a pruned student (if any), on the CPU in fp32: parameters, weight bytes (``torch.save`` of the state_dict), and
latency per image at batch 1 and batch 64: one warm-up call, then timed calls (at least :data:`MIN_REPEATS`, more
while within :data:`BUDGET_S` per model and batch size, at most :data:`MAX_REPEATS`), their median divided by the
batch size, on :data:`THREADS` thread (recorded): per-image cost as on a small device, and robust to other processes
on the CPU (with two threads on two busy cores a call can wait for a descheduled thread: timings 1000× too slow
were seen).
Random inputs of the data's shape.
Then per student, against the teacher: parameter ratio (pruned: against its nonzero parameters), size and
speed ratios, and the accuracy given up (test accuracy, percentage points), as one line:
``student: 9.8× fewer params, 6.1× faster at batch 1, −0.9 pt`` (a student larger than its teacher: ``39.0× more
params``; slower: ``2.0× slower``).

Latencies are a guide, not a benchmark: the timed calls are few, and other processes share the CPU.
Unstructured pruning zeroes weights but keeps dense tensors, so it changes neither the size nor the speed here.
"""
from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

BATCHES = (1, 64)
BUDGET_S = 0.05   # timing budget per model and batch size (seconds), after the minimum repeats
MIN_REPEATS, MAX_REPEATS = 3, 30
THREADS = 1       # intra-op threads while timing (torch.set_num_threads; restored after)


@dataclass
class Measured:
    """A model of the report: its test accuracy (percent) and, for a pruned one, its nonzero parameters."""

    model: nn.Module
    test_acc: Optional[float]
    nonzero_params: Optional[int] = None


@contextlib.contextmanager
def threads(n: int):
    """``torch.set_num_threads(n)`` inside the block, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the saved weights."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.inference_mode()
def latency(model: nn.Module, shape: tuple, batch: int, budget_s: float = BUDGET_S) -> dict:
    """Median wall time of ``model`` on a random ``[batch, *shape]`` input after one warm-up call."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    model(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_REPEATS or (len(times) < MAX_REPEATS and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"ms_per_image": round(1000 * median / batch, 6), "ms_per_batch": round(1000 * median, 6),
            "repeats": len(times)}


def profile(model: nn.Module, shape: tuple, test_acc: Optional[float], nonzero: Optional[int] = None) -> dict:
    """Parameters, weight bytes and CPU latency of ``model`` (a CPU copy in eval mode; ``model`` is untouched)."""
    model = copy.deepcopy(model).cpu().float().eval()
    params = sum(p.numel() for p in model.parameters())
    out = {"params": params, "weight_bytes": weight_bytes(model), "test_acc": test_acc,
           "latency": {f"batch_{b}": latency(model, shape, b) for b in BATCHES}}
    if nonzero is not None:
        out["nonzero_params"] = nonzero
    return out


def versus(teacher: dict, student: dict) -> dict:
    """``student`` against ``teacher`` (two :func:`profile` entries): how many times smaller and faster, and the
    test accuracy given up (student − teacher, percentage points)."""
    ratio = lambda a, b: round(a / b, 3) if b else None
    speed = {f"speedup_{k}": ratio(teacher["latency"][k]["ms_per_image"], student["latency"][k]["ms_per_image"])
             for k in teacher["latency"]}
    acc = None
    if teacher["test_acc"] is not None and student["test_acc"] is not None:
        acc = round(student["test_acc"] - teacher["test_acc"], 4)
    return {"params_ratio": ratio(teacher["params"], student.get("nonzero_params", student["params"])),
            "size_ratio": ratio(teacher["weight_bytes"], student["weight_bytes"]), **speed, "acc_delta_pt": acc}


def line(role: str, entry: dict) -> str:
    """``student: 9.8× fewer params, 6.1× faster at batch 1, −0.9 pt`` (an entry with ``vs_teacher``); a student
    larger or slower than its teacher reads ``39.0× more params``, ``2.0× slower``."""
    vs = entry["vs_teacher"]
    params = "nonzero params" if "nonzero_params" in entry else "params"
    who = "pruned student" if role == "student_pruned" else role
    text = (f"{who}: {times(vs['params_ratio'], 'fewer', 'more', 'as many')} {params}, "
            f"{times(vs['speedup_batch_1'], 'faster', 'slower', 'as fast')} at batch 1")
    if vs["acc_delta_pt"] is not None:
        text += f", {vs['acc_delta_pt']:+.1f} pt".replace("-", "−")
    return text


def times(ratio: Optional[float], less: str, more: str, same: str) -> str:
    """A teacher / student ratio in words: ``9.8× fewer`` (ratio 9.8), ``39.0× more`` (ratio 1/39), ``as many``
    (1.0 to one decimal either way); ``?`` when the ratio is unknown (a zero)."""
    if not ratio:
        return f"?× {less}"
    if round(ratio, 1) == 1.0 or round(1 / ratio, 1) == 1.0:
        return same
    return f"{ratio:.1f}× {less}" if ratio > 1 else f"{1 / ratio:.1f}× {more}"


def report(models: dict[str, Measured], shape: tuple) -> dict:
    """The report over ``models`` (by role), the teacher (if any) under ``"teacher"``; every other role is
    compared with it."""
    out: dict = {"device": "cpu", "dtype": "float32", "threads": THREADS, "warmup_calls": 1,
                 "statistic": "median", "inputs": "random", "shape": list(shape)}
    with threads(THREADS):
        for role, entry in models.items():
            out[role] = profile(entry.model, shape, entry.test_acc, entry.nonzero_params)
    lines = []
    if "teacher" in out:
        for role in models:
            if role != "teacher":
                out[role]["vs_teacher"] = versus(out["teacher"], out[role])
                lines.append(line(role, out[role]))
    out["lines"] = lines
    return out


def from_run(ctx, data) -> Optional[dict]:
    """The report of a finished run: its teacher (when the mode has one model over all classes as teacher, i.e.
    offline and semi, or a teacher ensemble, timed as one model running every member), its student (the checkpoint
    ``trainer.select`` names) and pruned student, rebuilt from the run's config with the weights of their checkpoints."""
    from kdrun.outputs.export import load_student

    result, models = ctx.result, {}
    for teacher in (ctx.teachers.first, ctx.teachers.ensemble):  # an ensemble: one model running all its members
        if teacher is not None and result.teacher is not None and teacher.result is result.teacher:
            models["teacher"] = Measured(teacher.model, result.teacher.test_acc)
    checkpoints = Path(ctx.out_dir) / "checkpoints"
    student = result.student
    if student is not None and (checkpoints / f"student_{student.select}.pt").exists():  # trainer.select's
        models["student"] = Measured(load_student(checkpoints / f"student_{student.select}.pt", ctx.cfg_dict)[0],
                                     student.test_acc)
    pruned = result.student_pruned
    if pruned is not None and (checkpoints / "student_pruned_best.pt").exists():
        models["student_pruned"] = Measured(load_student(checkpoints / "student_pruned_best.pt", ctx.cfg_dict)[0],
                                            pruned.test_acc_best, pruned.nonzero_params)
    if not models:
        return None
    return report(models, (data.channels, data.image_size, data.image_size))
