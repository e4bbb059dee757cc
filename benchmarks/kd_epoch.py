"""KD-epoch benchmark: the torchdistill harness's workload (../shared/bench/torchdistill) run through kdrun.

Fashion-MNIST (60k train, no val split, 10k test), cnn teacher -> 2-layer mlp student, T=4, alpha=0.9
(= torchdistill alpha 0.1 / beta 0.9), SGD lr 0.05 momentum 0.9 wd 5e-4, no schedule, batch 128, 3 epochs,
repeats with seeds 0, 1, 2. Timing per epoch covers the training loop only (batching, teacher logits, student
step; validation excluded), as in the harness. Prints the harness's RESULT keys with "framework": "kdrun".

    python benchmarks/kd_epoch.py                        # cache on (default: teacher.cache=auto)
    python benchmarks/kd_epoch.py --cache off            # live teacher on every batch
    python benchmarks/kd_epoch.py --teacher-ckpt /tmp/td_bench/ckpt/fmnist_cnn_teacher.state_dict.pt

Without --teacher-ckpt the teacher is trained by kdrun with the harness's recipe (plain CE, 4 epochs, SGD 0.05,
cosine, batch 128, seed 0) into the benchmark's own store, and its training time is reported too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from kdrun.run import run
from kdrun.schema.configstore import register_configs

WORKLOAD = [
    "dataset=fashion_mnist", "dataset.val_fraction=0", "teacher=cnn", "student=mlp",
    "loss=kd", "loss.T=4", "loss.alpha=0.9", "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9",
    "optim.weight_decay=5e-4", "sched=none", "trainer.batch_size=128", "trainer.eval_batch_size=512",
    "teacher.epochs=4", "teacher.batch_size=128", "teacher.optim.lr=0.05", "teacher.sched.name=cosine",
    "teacher.seed=0", "baseline=false", "trainer.progress=false",
]


def compose_cfg(overrides: list[str]):
    register_configs()
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def run_once(work: Path, name: str, overrides: list[str]) -> tuple[dict, list[dict], float]:
    out_dir = work / "runs" / name
    start = time.perf_counter()
    summary = run(compose_cfg(overrides), out_dir)
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cache", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--cache-dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--teacher-ckpt", default=None, help="a plain state_dict of the harness teacher")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--work-dir", default=None, help="default: a fresh temp dir (cold store and cache)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdrun_bench_"))
    common = WORKLOAD + [f"trainer.epochs={args.epochs}", f"teacher.cache={args.cache}",
                         f"teacher.cache_dtype={args.cache_dtype}", f"store.teachers={work / 'teachers'}",
                         f"store.baselines={work / 'baselines'}"]
    if args.teacher_ckpt:
        common.append(f"teacher.ckpt={args.teacher_ckpt}")
    if args.train_subset:
        common.append(f"dataset.train_subset={args.train_subset}")
    repeats = []
    for r in range(args.repeats):
        summary, metrics, wall = run_once(work, f"repeat{r}-{args.cache}", common + [f"seed={r}"])
        epoch_s = [m["time_s"] for m in metrics]
        n_train = summary["dataset"]["train"]
        repeats.append({"seed": r, "epoch_seconds": epoch_s, "mean_epoch_seconds": statistics.mean(epoch_s),
                        "samples_per_s": n_train / statistics.mean(epoch_s), "final_test_acc": summary["student"]["test_acc_last"],  # noqa: E501
                        "teacher_test_acc": summary["teacher"]["test_acc"], "teacher_reused": summary["teacher"]["reused"],
                        "cache": summary["teacher"].get("cache"), "wall_s": round(wall, 2)})
        print(f"[kdrun bench] repeat {r}: epochs {['%.3f' % e for e in epoch_s]} s, final test acc "
              f"{repeats[-1]['final_test_acc']:.2f}%, teacher {repeats[-1]['teacher_test_acc']:.2f}% "
              f"({'reused' if repeats[-1]['teacher_reused'] else 'trained'}), run wall {wall:.1f}s", flush=True)
    teacher_train = json.loads((work / "runs" / f"repeat0-{args.cache}" / "summary.json").read_text())
    teacher_epochs = [json.loads(line)["time_s"] for f in (work / "teachers").glob("cnn-*/metrics.jsonl")
                      for line in f.read_text().splitlines()]
    result = {
        "framework": "kdrun",
        "median_epoch_seconds": round(statistics.median(r["mean_epoch_seconds"] for r in repeats), 3),
        "median_samples_per_s": round(statistics.median(r["samples_per_s"] for r in repeats)),
        "median_final_test_acc": round(statistics.median(r["final_test_acc"] for r in repeats), 2),
        "teacher_test_acc": round(repeats[0]["teacher_test_acc"], 2),
        "cache": args.cache, "cache_used": bool(repeats[0]["cache"] and repeats[0]["cache"]["used"]),
        "cache_build_s": (repeats[0]["cache"] or {}).get("build_s"),
        "first_run_wall_s": repeats[0]["wall_s"], "teacher_source": teacher_train["teacher"]["source"],
        "teacher_train_epoch_seconds": round(statistics.median(teacher_epochs), 3) if teacher_epochs else None,
    }
    out = Path(args.json_out or work / "result.json")
    out.write_text(json.dumps({"repeats": repeats, "result": result}, indent=2))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
