"""Augmented-KD benchmark: the harness workload with and without crop/flip, side by side in one process.

The workload of ``kd_epoch.py`` (Fashion-MNIST, cnn teacher -> mlp student, T=4, alpha=0.9, SGD, batch 128),
and its augmented variant (``../shared/bench/torchdistill/configs/fmnist_kd_aug.yaml``: random crop with
padding 2 + horizontal flip, 50 views per image). One command prints the s / KD epoch (training loop only,
as in the harness) of

* the unaugmented KD run with the train-split logit cache (warm),
* the augmented run with the teacher live on every batch (``teacher.cache=off``),
* the augmented run with the view cache, cold (the first job: fills it) and warm (a later job of a T sweep with
  the same seed: all hits),

and the ratio warm view cache / unaugmented cached (goal <= 1.3). The warm runs of both kinds alternate
(``--repeats`` times) so that they see the same machine load.

    python benchmarks/kd_augment.py                       # trains the teacher (harness recipe) into its store
    python benchmarks/kd_augment.py --teacher-ckpt /tmp/td_bench/ckpt/fmnist_cnn_teacher.state_dict.pt
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kd_epoch import WORKLOAD, run_once  # noqa: E402  (the same workload as the epoch benchmark)

AUGMENT = ["dataset.augment.crop_padding=2", "dataset.augment.hflip=true"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="alternating warm runs of each kind")
    p.add_argument("--cache-dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--teacher-ckpt", default=None, help="a plain state_dict of the harness teacher")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="trainer.num_threads (default: torch's)")
    p.add_argument("--work-dir", default=None, help="default: a fresh temp dir (cold store and caches)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdrun_aug_bench_"))
    common = WORKLOAD + [f"trainer.epochs={args.epochs}", f"teacher.cache_dtype={args.cache_dtype}",
                         f"store.teachers={work / 'teachers'}", f"store.baselines={work / 'baselines'}", "seed=0"]
    if args.teacher_ckpt:
        common.append(f"teacher.ckpt={args.teacher_ckpt}")
    if args.train_subset:
        common.append(f"dataset.train_subset={args.train_subset}")
    if args.threads:
        common.append(f"trainer.num_threads={args.threads}")
    runs: dict[str, list] = {}

    def bench(kind: str, name: str, overrides: list[str]) -> dict:
        summary, metrics, wall = run_once(work, name, common + overrides)
        epochs = [m["time_s"] for m in metrics]
        cache = summary["teacher"].get("cache") or {}
        row = {"run": name, "epoch_seconds": epochs, "median_epoch_s": statistics.median(epochs),
               "test_acc": summary["student"]["test_acc_last"], "wall_s": round(wall, 2),
               "cache": {k: cache.get(k) for k in ("kind", "used", "built", "build_s", "filled_at_start", "hits",
                                                   "misses") if k in cache}}
        runs.setdefault(kind, []).append(row)
        print(f"[kdrun aug bench] {kind:<14} {name:<10} epochs {['%.3f' % e for e in epochs]} s, test "
              f"{row['test_acc']:.2f}%, cache {row['cache']}, run wall {wall:.1f}s", flush=True)
        return summary

    first = bench("unaug_cached", "unaug-0", ["teacher.cache=auto"])  # trains the teacher, builds the logit cache
    if not args.teacher_ckpt and first["teacher"]["source"] == "store":  # the same teacher for every run below
        common.append(f"teacher.ckpt={Path(first['teacher']['store_dir']) / 'model.pt'}")
    bench("aug_live", "live", ["teacher.cache=off", *AUGMENT])
    bench("aug_view_cold", "view-cold", ["teacher.cache=auto", *AUGMENT])
    for r in range(1, args.repeats + 1):
        bench("unaug_cached", f"unaug-{r}", ["teacher.cache=auto"])
        bench("aug_view_warm", f"view-T{r}", ["teacher.cache=auto", f"loss.T={r}", *AUGMENT])  # a later sweep job

    def median(kind: str, warm_only: bool = False) -> float:
        rows = runs[kind][1:] if warm_only else runs[kind]
        return round(statistics.median(e for row in rows for e in row["epoch_seconds"]), 3)

    unaug, warm = median("unaug_cached", warm_only=True), median("aug_view_warm")
    result = {
        "framework": "kdrun", "epochs": args.epochs, "cache_dtype": args.cache_dtype, "threads": args.threads,
        "unaug_cached_epoch_s": unaug, "aug_live_epoch_s": median("aug_live"),
        "aug_view_cold_epoch_s": median("aug_view_cold"), "aug_view_warm_epoch_s": warm,
        "ratio_warm_view_over_unaug": round(warm / unaug, 2),
        "ratio_live_over_warm_view": round(median("aug_live") / warm, 2),
        "warm_view_misses": sum(row["cache"].get("misses", 0) for row in runs["aug_view_warm"]),
        "test_acc": {kind: [row["test_acc"] for row in rows] for kind, rows in runs.items()},
    }
    out = Path(args.json_out or work / "result_augment.json")
    out.write_text(json.dumps({"runs": runs, "result": result}, indent=2))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
