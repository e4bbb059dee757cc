"""Cached-epoch time of every logit loss, side by side with ``kd``: the harness's Fashion-MNIST workload
(benchmarks/kd_epoch.py's WORKLOAD: cnn teacher -> mlp student, batch 128, no val split), teacher logits from the
exact cache. The losses run interleaved (kd, mse, soft_ce, ..., kd, mse, ...) for ``--rounds`` rounds so that a
noisy, shared machine slows them alike; each round is one run of ``--epochs`` epochs per loss. Prints the median
training-loop seconds per epoch of each loss and its ratio to kd's (goal: every logit loss within 1.1×).

    python benchmarks/loss_epoch.py                          # full 60k train split, 3 rounds x 2 epochs
    python benchmarks/loss_epoch.py --train-subset 10000 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_epoch import WORKLOAD, run_once  # noqa: E402

LOSSES = {"kd": ["loss=kd"], "kd+standardize": ["loss=kd", "loss.standardize=true"], "mse": ["loss=mse"],
          "soft_ce": ["loss=soft_ce"], "hard": ["loss=hard"], "dkd": ["loss=dkd"], "dist": ["loss=dist"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="trainer.num_threads (default: torch's)")
    p.add_argument("--work-dir", default=None, help="default: a fresh temp dir (the teacher is trained once there)")
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdrun_loss_bench_"))
    common = [o for o in WORKLOAD if not o.startswith("loss")] + [
        f"trainer.epochs={args.epochs}", "teacher.cache=on", f"store.teachers={work / 'teachers'}",
        f"store.baselines={work / 'baselines'}"]
    if args.train_subset:
        common.append(f"dataset.train_subset={args.train_subset}")
    if args.threads:
        common.append(f"trainer.num_threads={args.threads}")
    common += ["report=false", "compression=false"]  # per-run extras, not the epoch: out of the way
    epochs: dict[str, list[float]] = {name: [] for name in LOSSES}
    for r in range(args.rounds):
        for name, overrides in LOSSES.items():
            summary, metrics, _ = run_once(work, f"r{r}-{name}", common + overrides + [f"seed={r}"])
            assert summary["teacher"]["cache"]["used"], f"{name}: the logit cache was not used"
            epochs[name] += [m["time_s"] for m in metrics]
        print(f"[loss bench] round {r + 1}/{args.rounds} done", flush=True)
    kd = statistics.median(epochs["kd"])
    result = {name: {"median_epoch_s": round(statistics.median(e), 4),
                     "ratio_to_kd": round(statistics.median(e) / kd, 3)} for name, e in epochs.items()}
    print(f"{'loss':<16}{'s/epoch':>10}{'× kd':>8}")
    for name, row in result.items():
        print(f"{name:<16}{row['median_epoch_s']:>10.3f}{row['ratio_to_kd']:>8.3f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
