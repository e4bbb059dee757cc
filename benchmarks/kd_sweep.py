"""Sweep benchmark: a 3x3 T x alpha grid on the harness workload through `kdrun -m`, teacher training included.

Runs the real CLI once (Hydra multirun, 9 jobs in one process) on a cold store: the teacher is trained once
(kdrun, the harness's recipe), its train-set logits are cached once, and nine students are distilled.
Compares the wall time with torchdistill's figures from the harness's results JSON (run it first, side by
side on the same machine): the sensible workflow (teacher trained once + nine KD runs) and nine independent
runs that each train their teacher.

    python benchmarks/kd_sweep.py --td-json /tmp/td_bench/results/td_bench-<stamp>.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kd_epoch import WORKLOAD  # noqa: E402  (the same workload as the epoch benchmark)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--temperatures", default="1,4,8")
    p.add_argument("--alphas", default="0.5,0.7,0.9")
    p.add_argument("--td-json", default=None, help="the harness's results JSON of a run that trained its teacher "
                                                    "(default: newest in /tmp/td_bench/results; '' for none)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--augment", action="store_true",
                   help="the augmented workload (crop padding 2 + flip): the teacher's logits per (image, view)")
    p.add_argument("--teacher-augmented", action="store_true",
                   help="with --augment: train the teacher on the augmented images too (kdrun's default); without "
                        "it the teacher trains on plain images, as the harness's augmented config does")
    p.add_argument("overrides", nargs="*", help="more kdrun overrides for every job, e.g. trainer.precision=bf16")
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdrun_sweep_"))
    cmd = [sys.executable, "-m", "kdrun", "-m", f"loss.T={args.temperatures}", f"loss.alpha={args.alphas}",
           *[o for o in WORKLOAD if not o.startswith(("loss.T=", "loss.alpha="))], f"trainer.epochs={args.epochs}", f"store.teachers={work / 'teachers'}",  # noqa: E501
           f"store.baselines={work / 'baselines'}", f"hydra.sweep.dir={work / 'sweep'}"]
    if args.augment:
        cmd += ["dataset.augment.crop_padding=2", "dataset.augment.hflip=true"]
        if not args.teacher_augmented:
            cmd += ["teacher.augment.crop_padding=0", "teacher.augment.hflip=false"]
    cmd += args.overrides
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summaries = [json.loads(f.read_text()) for f in sorted((work / "sweep").glob("*/summary.json"))]
    trained = sum(not s["teacher"]["reused"] for s in summaries)
    entry = Path(summaries[0]["teacher"]["store_dir"]) / "metrics.jsonl"
    teacher_s = sum(json.loads(line)["time_s"] for line in entry.read_text().splitlines()) if entry.is_file() else None
    result = {"framework": "kdrun", "augment": args.augment, "jobs": len(summaries), "teachers_trained": trained,
              "teacher_train_s": round(teacher_s, 1) if teacher_s else None,
              "teacher_test_acc": summaries[0]["teacher"]["test_acc"],
              "teacher_cache_misses": [s["teacher"].get("cache", {}).get("misses") for s in summaries],
              "sweep_wall_s": round(wall, 1), "student_test_acc": {f"T={s['loss']['T']:g},alpha={s['loss']['alpha']:g}":
                                                                   s["student"]["test_acc_last"] for s in summaries}}
    td_json = args.td_json if args.td_json is not None else max(glob.glob("/tmp/td_bench/results/*.json"),
                                                                 default=None, key=os.path.getmtime)
    td = json.load(open(td_json))["summary"] if td_json else None
    if td and td["teacher_train_seconds"] is not None:  # a results JSON of a run that trained its teacher
        kd_run = args.epochs * td["median_epoch_seconds"]
        sensible, independent = td["teacher_train_seconds"] + len(summaries) * kd_run, len(summaries) * (td["teacher_train_seconds"] + kd_run)  # noqa: E501
        result.update(td_json=td_json, td_teacher_train_s=round(td["teacher_train_seconds"], 1),
                      td_kd_epoch_s=round(td["median_epoch_seconds"], 2), td_sensible_s=round(sensible, 1),
                      td_independent_s=round(independent, 1), speedup_vs_sensible=round(sensible / wall, 2),
                      speedup_vs_independent=round(independent / wall, 2))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
