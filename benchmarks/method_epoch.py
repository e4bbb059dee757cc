"""Seconds per training epoch of every feature / relation method next to kd's, on the method table's workload
(docs/losses.md: Fashion-MNIST 10k-image subset, cnn teacher -> narrow cnn student, batch 64, one thread).

kd runs twice: from the exact logit cache (its normal path) and with the live teacher (``teacher.cache=off``), which
is what every method that reads features pays: the teacher's forward on each batch. The methods run interleaved
(kd, kd-live, fitnet, at, sp, ..., kd, ...) for ``--rounds`` rounds, so a shared machine slows them alike; a round
is one run of ``--epochs`` epochs per method. Prints the median training-loop seconds per epoch (metrics.jsonl's
``time_s``: the loop, not validation) and the ratios to kd (cached) and to kd-live. Methods with an initialisation
phase (ab, fsp) or a pre-trained part (ft's paraphraser) are timed on their main-phase epochs only.

    python benchmarks/method_epoch.py                        # every method, 2 rounds x 2 epochs
    python benchmarks/method_epoch.py --methods kd,crd,rkd --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_epoch import run_once  # noqa: E402

WORKLOAD = ["experiment=fashion_mnist", "dataset.train_subset=10000", "student=cnn", "student.args.channels=4",
            "student.args.hidden=32", "teacher.epochs=20", "trainer.num_threads=1", "baseline=false",
            "report=false", "compression=false", "trainer.progress=false"]


def methods() -> list[str]:
    from kdrun.losses.methods import METHODS

    return ["fitnet", "at", *METHODS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--methods", default=None, help="comma-separated (default: every feature / relation method)")
    p.add_argument("--work-dir", default=None, help="default: a fresh temp dir (the teacher is trained once there)")
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdrun_method_bench_"))
    common = WORKLOAD + [f"trainer.epochs={args.epochs}", f"store.teachers={work / 'teachers'}",
                         f"store.baselines={work / 'baselines'}"]
    runs = {"kd": ["loss=kd"], "kd-live": ["loss=kd", "teacher.cache=off"]}
    for name in (args.methods.split(",") if args.methods else methods()):
        if name == "fsp":  # needs equal channel counts: the narrow student has 4 and 8, the teacher 32 and 64
            print("[method bench] fsp left out: it needs equal channel counts, which this pair has not")
            continue
        runs.setdefault(name, [f"loss={name}"] + (["loss.nce_k=4096"] if name == "crd" else []))  # 9,000 images
    epochs: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, overrides in runs.items():
            extra = [f"loss.init_epochs={args.epochs - 1}"] if name in ("ab", "fsp") else []  # time main-phase epochs
            summary, metrics, _ = run_once(work, f"r{r}-{name}", common + overrides + extra + [f"seed={r}"])
            first = 1 + (args.epochs - 1 if extra else 0)
            epochs[name] += [m["time_s"] for m in metrics if m.get("stage") == "student" and m["epoch"] >= first]
        print(f"[method bench] round {r + 1}/{args.rounds} done", flush=True)
    kd, live = statistics.median(epochs["kd"]), statistics.median(epochs["kd-live"])
    result = {name: {"median_epoch_s": round(statistics.median(e), 3), "x_kd": round(statistics.median(e) / kd, 2),
                     "x_kd_live": round(statistics.median(e) / live, 2)} for name, e in epochs.items()}
    print(f"{'method':<12}{'s/epoch':>10}{'× kd':>8}{'× kd-live':>11}")
    for name, row in result.items():
        print(f"{name:<12}{row['median_epoch_s']:>10.3f}{row['x_kd']:>8.2f}{row['x_kd_live']:>11.2f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
