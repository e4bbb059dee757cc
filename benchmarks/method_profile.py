"""Where a method's training step spends its time: torch.profiler over a few student steps on the method table's
workload (docs/losses.md: Fashion-MNIST, cnn teacher -> narrow cnn student, one thread), teacher live, the
method's learned modules included. Prints the step's median seconds split into the student's forward + backward,
the teacher's forward, the feature term (forward + backward through the loss's own modules), and the top
operators by self CPU time.

    python benchmarks/method_profile.py rkd
    python benchmarks/method_profile.py reviewkd --batch-size 64 --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from kdrun.losses.base import build
    from kdrun.losses.hooks import FeaturePairs
    from kdrun.models import build_model

    teacher = build_model("cnn", num_classes=10, in_channels=1, image_size=28, args={}).eval()
    student = build_model("cnn", num_classes=10, in_channels=1, image_size=28, args={"channels": 4, "hidden": 32})
    x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    loss = build(args.method)
    if hasattr(loss, "setup_data"):  # crd: memory banks over a Fashion-MNIST-sized train split
        kwargs = {"nce_k": 4096} if args.method == "crd" else {}
        loss = build(args.method, **kwargs)
        loss.setup_data(torch.arange(9000) % 10)
    pairs = FeaturePairs(loss, student, teacher, x[:2])
    opt = torch.optim.SGD([*student.parameters(), *loss.parameters()], lr=0.01)
    parts: dict[str, list[float]] = {"student fwd+bwd": [], "teacher fwd": [], "feature term fwd+bwd": [], "step": []}

    def step(profile: bool = False):
        t0 = time.perf_counter()
        with pairs.attach(student, teacher):
            with torch.no_grad():
                teacher(x)
            t1 = time.perf_counter()
            s_logits = student(x)
            fs, ft = pairs.student(), pairs.teacher()
        kw = {"index": torch.arange(len(x))} if getattr(loss, "needs_index", False) else {}
        t2 = time.perf_counter()
        feat = loss.feature_term(fs, ft, **kw) if kw else loss.feature_term(fs, ft)
        t3 = time.perf_counter()
        ce = torch.nn.functional.cross_entropy(s_logits, y)
        opt.zero_grad()
        ce.backward(retain_graph=True)
        t4 = time.perf_counter()
        (loss.beta * feat).backward()
        opt.step()
        t5 = time.perf_counter()
        if not profile:
            parts["teacher fwd"].append(t1 - t0)
            parts["student fwd+bwd"].append((t2 - t1) + (t4 - t3))
            parts["feature term fwd+bwd"].append((t3 - t2) + (t5 - t4))
            parts["step"].append(t5 - t0)

    student.train()
    for _ in range(2):  # warm-up
        step(True)
    for _ in range(args.steps):
        step()
    median = {k: statistics.median(v) for k, v in parts.items()}
    print(f"loss={args.method}, batch {args.batch_size}, one thread: median step {median['step'] * 1000:.1f} ms")
    for name in ("student fwd+bwd", "teacher fwd", "feature term fwd+bwd"):
        print(f"  {name:<22}{median[name] * 1000:>9.1f} ms  {100 * median[name] / median['step']:>5.1f} %")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    sys.exit(main())
