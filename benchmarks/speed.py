"""Every speed figure of the README in one command: kdrun and torchdistill side by side, on this machine.

Runs, one after the other (nothing else should run meanwhile; the figures to read are the ratios):

1. torchdistill (the harness in ``../shared/bench/torchdistill``, when ``--td-python`` has it installed): its
   teacher training and 3-epoch KD run without augmentation, then its augmented KD run (``fmnist_kd_aug.yaml``:
   crop padding 2 + flip; the same, plain-trained teacher), one repeat each;
2. ``kd_augment.py``: kdrun's s / KD epoch without augmentation (train-split logit cache), augmented with the
   teacher live, and with the view cache cold and warm;
3. ``kd_sweep.py`` twice: the 3x3 T x alpha sweep through ``kdrun -m`` with its teacher training, without and
   with augmentation (the teacher trains on plain images, as the harness's does).

and prints one table: each figure for torchdistill and kdrun and their ratio, the sweeps against torchdistill
used sensibly (its teacher trained once + nine KD runs of 3 epochs, from its measured times), and the student
accuracies side by side.

    python benchmarks/speed.py                                   # ~/.venv-td/bin/python for torchdistill
    python benchmarks/speed.py --td-python none                  # kdrun's figures only
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent.parent / "shared" / "bench" / "torchdistill"


def run(cmd: list[str], cwd: Path | None = None) -> dict:
    """Run ``cmd``, echo its output, return its last ``RESULT {...}`` line."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    print(proc.stdout[-2500:], end="", flush=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--td-python", default=str(Path.home() / ".venv-td" / "bin" / "python"),
                   help="a Python with torchdistill (see the harness's README); 'none' to skip it")
    p.add_argument("--harness", default=str(HARNESS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--work-dir", default=None)
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kdrun_speed_"))
    py = sys.executable
    td: dict = {}
    if args.td_python != "none" and Path(args.td_python).exists():
        common = [args.td_python, "run_td_bench.py", "--repeats", 1, "--epochs", args.epochs,
                  "--work-dir", work / "td"]
        run(common + ["--json-out", work / "td_plain.json"], cwd=Path(args.harness))  # trains its teacher
        td["plain"] = json.loads((work / "td_plain.json").read_text())["summary"]
        run(common + ["--kd-config", "configs/fmnist_kd_aug.yaml", "--json-out", work / "td_aug.json"],
            cwd=Path(args.harness))
        td["aug"] = json.loads((work / "td_aug.json").read_text())["summary"]
    else:
        print(f"torchdistill: not run ({args.td_python} not found); kdrun's figures only", flush=True)
    epochs = run([py, HERE / "kd_augment.py", "--epochs", args.epochs, "--work-dir", work / "augment"])
    sweeps = {kind: run([py, HERE / "kd_sweep.py", "--epochs", args.epochs, "--td-json", "",
                         "--work-dir", work / f"sweep_{kind}", *(["--augment"] if kind == "aug" else [])])
              for kind in ("plain", "aug")}

    rows = []

    def row(figure: str, td_value, kd_value, unit: str = "s") -> None:
        ratio = f"{td_value / kd_value:.1f}x" if td_value and kd_value and unit == "s" else ""
        fmt = lambda v: "-" if v is None else (f"{v:.2f}" if unit == "s" else f"{v:.2f} %")
        rows.append((figure, fmt(td_value), fmt(kd_value), ratio))

    tdp, tda = td.get("plain", {}), td.get("aug", {})
    sensible = lambda t, jobs: (tdp["teacher_train_seconds"] + jobs * args.epochs * t["median_epoch_seconds"]) \
        if t else None
    row("KD epoch, no augmentation (kdrun: logit cache)", tdp.get("median_epoch_seconds"),
        epochs["unaug_cached_epoch_s"])
    row("KD epoch, crop + flip, teacher live", tda.get("median_epoch_seconds"), epochs["aug_live_epoch_s"])
    row("KD epoch, crop + flip (kdrun: warm view cache)", tda.get("median_epoch_seconds"),
        epochs["aug_view_warm_epoch_s"])
    row("teacher training, 4 epochs", tdp.get("teacher_train_seconds"), sweeps["plain"]["teacher_train_s"])
    speedups = {}
    for kind, label, t in (("plain", "no augmentation", tdp), ("aug", "crop + flip", tda)):
        jobs = sweeps[kind]["jobs"]
        row(f"3x3 T x alpha sweep incl. teacher, {label} ({jobs} jobs)", sensible(t, jobs), sweeps[kind]["sweep_wall_s"])
        speedups[kind] = rows[-1][3]
    key = "T=4,alpha=0.9"
    row("student test acc, T=4 alpha=0.9, no augmentation", tdp.get("median_final_test_acc"),
        sweeps["plain"]["student_test_acc"].get(key), unit="%")
    row("student test acc, T=4 alpha=0.9, crop + flip", tda.get("median_final_test_acc"),
        sweeps["aug"]["student_test_acc"].get(key), unit="%")
    row("teacher test acc", tdp.get("teacher_test_acc"), sweeps["plain"]["teacher_test_acc"], unit="%")
    print("\n| figure | torchdistill | kdrun | torchdistill / kdrun |\n| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nwarm view cache / unaugmented cached epoch: {epochs['ratio_warm_view_over_unaug']}x (goal <= 1.3x); "
          f"teacher misses per augmented sweep job: {sweeps['aug']['teacher_cache_misses']}")
    result = {"torchdistill": td, "kd_augment": epochs, "sweeps": sweeps, "table": rows}
    (work / "speed.json").write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps({"ratio_warm_view_over_unaug": epochs["ratio_warm_view_over_unaug"],
                                  "sweep_wall_s": {k: v["sweep_wall_s"] for k, v in sweeps.items()},
                                  "sweep_speedup_vs_td_sensible": speedups}))


if __name__ == "__main__":
    main()
