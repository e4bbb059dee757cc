"""A deployable student: export (TorchScript, ONNX) and kdrun-export, the compression report, pruning.

One in-process smoke run (digits, cnn -> mlp, 2 epochs; ``export=[torchscript,onnx]``, a gradually pruned student)
is shared by the module; a second one (stores reused) covers one-shot pruning. ONNX tests skip when onnx or
onnxruntime is missing (the ``test`` extra installs both, so CI runs them)."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, cli_env, compose_config, read_json, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import build_model
from kdrun.outputs import compression, export
from kdrun.schema import to_object
from kdrun.stages import pruning

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
HAS_ONNX = importlib.util.find_spec("onnx") is not None
FORMATS = ["torchscript", "onnx"] if HAS_ONNX else ["torchscript"]
AMOUNT = 0.5


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The shared run: (run dir, summary)."""
    base = tmp_path_factory.mktemp("export")
    run_dir = base / "run"
    summary = smoke_inproc(base, run_dir, f"export=[{','.join(FORMATS)}]", f"student.prune.amount={AMOUNT}",
                           "trainer.num_threads=1", "compression=true")
    return run_dir, summary


def digits_model(name: str) -> nn.Module:
    return build_model(name, num_classes=10, in_channels=1, image_size=8)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- export ------------------------------------------------------------------------------------------------------

def test_export_writes_reloadable_files_and_records_the_difference(smoke_run):
    run_dir, summary = smoke_run
    record = summary["export"]
    assert record["formats"] == FORMATS and record["input"]["checked_on"] == "test"
    assert record["input"]["shape"] == ["batch", 1, 8, 8]
    for stage in ("student", "student_pruned"):
        for fmt in FORMATS:
            entry = record[stage][fmt]
            path = run_dir / entry["file"]
            assert path.parent == run_dir / "checkpoints" and path.name == f"{stage}{export.EXPORT_FORMATS[fmt]}"
            assert entry["bytes"] == path.stat().st_size > 0
            assert entry["checked"] is True and entry["images"] == 64
            assert 0 <= entry["max_abs_diff"] < 1e-4 and entry["same_predictions"] == 1.0
    model, _ = export.load_student(run_dir / "checkpoints" / "student_best.pt")
    x = torch.randn(5, 1, 8, 8)
    traced = torch.jit.load(str(run_dir / "checkpoints" / "student.ts"))
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5)


def test_onnx_has_a_dynamic_batch_axis(smoke_run):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    run_dir, _ = smoke_run
    model, _ = export.load_student(run_dir / "checkpoints" / "student_best.pt")
    session = ort.InferenceSession(str(run_dir / "checkpoints" / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        out = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            assert out.shape == (batch, 10) and torch.allclose(torch.from_numpy(out), model(x), atol=1e-4)


def test_exported_student_carries_its_preprocessing(smoke_run):
    """mean / std, input shape and class names were only in summary.json: student.json beside the exported files
    and the ONNX file's metadata_props carry them."""
    run_dir, summary = smoke_run
    record = summary["export"]
    for stage in ("student", "student_pruned"):
        assert record["preprocessing"][stage] == f"checkpoints/{stage}.json"
        info = read_json(run_dir / "checkpoints" / f"{stage}.json")
        assert info["mean"] == record["input"]["mean"] and info["std"] == record["input"]["std"]
        assert info["input_shape"] == ["batch", 1, 8, 8] and info["dtype"] == "float32"
        assert (info["input_name"], info["output_name"]) == ("images", "logits")
        assert info["class_names"] == [str(i) for i in range(10)] and info["dataset"] == "digits"
        assert info["files"] == {fmt: f"{stage}{export.EXPORT_FORMATS[fmt]}" for fmt in FORMATS}
        assert "(x - mean) / std" in info["preprocess"]
    if HAS_ONNX:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(run_dir / "checkpoints" / "student.onnx")).metadata_props}
        info = read_json(run_dir / "checkpoints" / "student.json")
        assert json.loads(props["mean"]) == info["mean"] and json.loads(props["std"]) == info["std"]
        assert json.loads(props["class_names"]) == info["class_names"] and props["dataset"] == "digits"
        assert json.loads(props["input_shape"]) == ["batch", 1, 8, 8] and "files" not in props
    names = [f"class {i}" for i in range(10)]  # the loaded dataset's names; never looked up by the dataset's name
    deploy = lambda names: export.deployment({"meta": {"num_classes": 10, "name": "mlp"}},
                                             {"dataset": {"name": "fashion_mnist"}}, {"shape": ["batch", 1, 28, 28]},
                                             names=names)["class_names"]
    assert deploy(names) == names and deploy(None) == [str(i) for i in range(10)]


def test_the_deploy_docs_snippet_classifies_a_raw_image(smoke_run, tmp_path, capsys, monkeypatch):
    """docs/deploy.md's onnxruntime snippet, run as written on a PNG file: it prints the class the PyTorch
    student predicts for that image."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from kdrun.data.dataset import to_unit_float

    run_dir, summary = smoke_run
    text = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    snippet = re.search(r"<!-- tested: tests/test_export.py -->\n```python\n(.*?)```", text, re.S).group(1)
    info = read_json(run_dir / "checkpoints" / "student.json")
    data = load_digits_test()
    for index in range(3):  # the test image as an 8-bit grey PNG
        raw = (to_unit_float(data.test.x[index:index + 1])[0, 0] * 255).round().to(torch.uint8)
        Image.fromarray(raw.numpy(), mode="L").save(tmp_path / "my_image.png")
        x = (raw.float() / 255 - torch.tensor(info["mean"])) / torch.tensor(info["std"])
        model, _ = export.load_student(run_dir / "checkpoints" / "student_best.pt")
        with torch.no_grad():
            expected = info["class_names"][int(model(x[None, None]).argmax())]
        monkeypatch.chdir(tmp_path)
        code = snippet.replace("outputs/2026-11-23/10-00-00", str(run_dir))
        exec(compile(code, "deploy.md", "exec"), {})
        assert capsys.readouterr().out.strip() == expected


def load_digits_test():
    from kdrun.data.dataset import load_data
    from kdrun.schema import DatasetConfig, open_node

    return load_data(open_node(DatasetConfig, {"name": "digits"}, "dataset"), torch.device("cpu"))


def test_kdrun_export_cli_on_a_finished_run(smoke_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run[0], run_dir)
    (run_dir / "checkpoints" / "student.json").unlink()
    for fmt in FORMATS:
        (run_dir / "checkpoints" / f"student{export.EXPORT_FORMATS[fmt]}").unlink()
    before = read_json(run_dir / "summary.json")["export"]
    script = Path(PYTHON).parent / "kdrun-export"
    proc = subprocess.run([str(script), str(run_dir), "--formats", "torchscript"], capture_output=True, text=True,
                          env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checkpoints/student.ts" in proc.stdout
    after = read_json(run_dir / "summary.json")["export"]
    assert (run_dir / "checkpoints" / "student.ts").exists()
    assert read_json(run_dir / "checkpoints" / "student.json")["files"] == {"torchscript": "student.ts"}
    assert after["student"]["torchscript"]["max_abs_diff"] < 1e-4
    assert after["formats"] == FORMATS  # a format not exported now keeps its earlier record
    if HAS_ONNX:
        assert after["student"]["onnx"] == before["student"]["onnx"]


def test_kdrun_export_refuses_what_is_not_a_finished_run(tmp_path, capsys):
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "summary.json").write_text(json.dumps({"status": "failed"}))
    for argv, expected in (([str(tmp_path)], "is not a finished kdrun run: no summary.json"),
                           ([str(tmp_path / "failed")], "its status is 'failed', not 'completed'"),
                           ([str(tmp_path), "--formats", "tflite"], "--formats: unknown value 'tflite'; choose one "
                                                                    "of: onnx, torchscript")):
        with pytest.raises(SystemExit) as exit_:
            export.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_onnx_without_onnxruntime_is_written_and_its_check_skipped(tmp_path, monkeypatch, caplog):
    pytest.importorskip("onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    model = digits_model("mlp").eval()
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        out = export.export_model(model, tmp_path / "student", ["onnx"], torch.randn(4, 1, 8, 8))
    assert (tmp_path / "student.onnx").stat().st_size == out["onnx"]["bytes"] > 0
    assert out["onnx"]["checked"] is False and out["onnx"]["max_abs_diff"] is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not checked: onnxruntime is not installed" in warnings[0]


def test_a_format_that_fails_is_a_warning_and_an_error_record(tmp_path, monkeypatch, caplog):
    def broken(model, example, path):
        raise RuntimeError("cannot trace this\nsecond line")
    monkeypatch.setitem(export._WRITERS, "torchscript", broken)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        out = export.export_model(digits_model("mlp").eval(), tmp_path / "student", ["torchscript"],
                                  torch.randn(4, 1, 8, 8))
    assert out == {"torchscript": {"file": str(tmp_path / "student.ts"), "error": "RuntimeError: cannot trace this"}}
    assert [r.getMessage() for r in caplog.records] == ["export torchscript of student failed: RuntimeError: "
                                                        "cannot trace this"]


def test_check_images_fall_back_to_random_when_the_data_is_gone(caplog):
    checkpoint = {"meta": {"in_channels": 1, "image_size": 8}, "config": {"dataset": {"name": "no_such_dataset"}}}
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        inputs, record, _ = export._check_inputs(checkpoint)
    assert inputs.shape == (export.CHECK_IMAGES, 1, 8, 8) and record["checked_on"] == "random"
    assert len(caplog.records) == 1 and "checking on random inputs" in caplog.records[0].getMessage()


# --- compression -------------------------------------------------------------------------------------------------

def test_compression_report_counts_by_hand(smoke_run):
    run_dir, summary = smoke_run
    report = summary["compression"]
    teacher_params, student_params = n_params(digits_model("cnn")), n_params(digits_model("mlp"))
    assert report["teacher"]["params"] == teacher_params == summary["teacher"]["params"]
    assert report["student"]["params"] == student_params == summary["student"]["params"]
    assert report["student"]["vs_teacher"]["params_ratio"] == round(teacher_params / student_params, 3)
    pruned = report["student_pruned"]
    assert pruned["nonzero_params"] == summary["student_pruned"]["nonzero_params"]
    assert pruned["vs_teacher"]["params_ratio"] == round(teacher_params / pruned["nonzero_params"], 3)
    student, _ = export.load_student(run_dir / "checkpoints" / "student_best.pt")
    assert report["student"]["weight_bytes"] == compression.weight_bytes(student)
    assert report["threads"] == compression.THREADS == 1 and report["device"] == "cpu"
    for role in ("teacher", "student", "student_pruned"):
        for batch in ("batch_1", "batch_64"):
            timing = report[role]["latency"][batch]
            assert timing["ms_per_image"] > 0 and compression.MIN_REPEATS <= timing["repeats"] <= compression.MAX_REPEATS
    delta = report["student"]["vs_teacher"]["acc_delta_pt"]
    assert delta == round(summary["student"]["test_acc_best"] - summary["teacher"]["test_acc"], 4)
    line = report["lines"][0]
    assert re.fullmatch(r"student: \d+\.\d× fewer params, (\d+\.\d× (faster|slower)|as fast) at batch 1, [+−]\d+\.\d pt",
                        line), line
    assert line.endswith(f"{abs(delta):.1f} pt")
    assert line in (run_dir / "kdrun.log").read_text()  # printed under the results table


def test_compression_can_be_switched_off():
    assert to_object(compose_config("experiment=smoke", "compression=false")).compression is False


# --- pruning -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epoch, expected", [(1, 0.0), (2, 0.0), (3, 0.5 * (1 - (3 / 4) ** 3)), (4, 0.5 * (1 - 0.5 ** 3)),
                                             (5, 0.5 * (1 - (1 / 4) ** 3)), (6, 0.5), (9, 0.5)])
def test_cubic_schedule_by_hand(epoch, expected):
    assert pruning.sparsity_at(epoch, 0.5, start=3, end=6) == pytest.approx(expected)


@pytest.mark.parametrize("epochs, start, end", [(2, 2, 2), (4, 2, 3), (30, 9, 23), (1, 1, 1)])
def test_schedule_defaults(epochs, start, end):
    spec = to_object(compose_config("experiment=smoke", f"trainer.epochs={epochs}")).student.prune
    assert spec.ramp(epochs) == (start, end)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_global_magnitude_pruning_is_exact_and_cumulative():
    net = small_net()
    total = 4 * 9 + 144 * 10  # conv and linear weights; biases and BatchNorm are not pruned
    weights = torch.cat([net[0].weight.detach().flatten(), net[3].weight.detach().flatten()]).abs()
    assert pruning.prune_to(net, 0.3) == round(0.3 * total)
    first = [net[0].weight_mask.clone(), net[3].weight_mask.clone()]
    masks = torch.cat([m.flatten() for m in first])
    assert weights[masks == 0].max() <= weights[masks == 1].min()  # global: the smallest magnitudes went
    assert pruning.prune_to(net, 0.6) == round(0.6 * total) - round(0.3 * total)
    assert pruning.sparsity(net) == {"zeros": round(0.6 * total), "total": total,
                                     "sparsity": round(round(0.6 * total) / total, 6)}
    assert all(bool((old >= m).all()) for old, m in zip(first, (net[0].weight_mask, net[3].weight_mask)))
    assert pruning.prune_to(net, 0.5) == 0  # never lowers it
    pruning.make_permanent(net)
    keys = net.state_dict().keys()
    assert not any(k.endswith(("_orig", "_mask")) for k in keys)
    assert int((net[0].weight == 0).sum() + (net[3].weight == 0).sum()) == round(0.6 * total)
    assert bool((net[1].weight != 0).all())


def test_gradual_hook_keeps_the_best_epoch_at_full_sparsity():
    net = small_net()
    hook = pruning.GradualPruning(0.5, start=2, end=3)
    for epoch, val in ((1, 90.0), (2, 80.0), (3, 50.0), (4, 60.0), (5, 55.0)):
        hook.before_epoch(epoch, net)
        expected = pruning.sparsity_at(epoch, 0.5, 2, 3)
        assert pruning.sparsity(net)["sparsity"] == pytest.approx(expected, abs=1 / 1476)
        hook.after_epoch({"epoch": epoch, "val/acc": val})
    assert hook.best_epoch == 4 and [s["epoch"] for s in hook.steps] == [2, 3]


def test_gradual_hook_state_resumes_the_schedule():
    """The hook's state dict on a fresh model of the same architecture: the same masks, steps and best epoch, and
    the next pruning step ranks the same weights (the masked weights as the last forward left them)."""
    net, fresh = small_net(), small_net()
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # the resumed model starts elsewhere: its weights come from the checkpoint
    hook = pruning.GradualPruning(0.6, start=1, end=3, model=net)
    for epoch, val in ((1, 90.0), (2, 80.0)):
        hook.before_epoch(epoch, net)
        hook.after_epoch({"epoch": epoch, "val/acc": val})
    again = pruning.GradualPruning(0.6, start=1, end=3, model=fresh)
    again.load_state_dict(hook.state_dict())
    fresh.load_state_dict(net.state_dict())  # what fit does next
    assert again.steps == hook.steps and (again.best_epoch, again.best_state) == (hook.best_epoch, None)
    hook.before_epoch(3, net)
    again.before_epoch(3, fresh)
    for a, b in zip(pruning.prunable(net), pruning.prunable(fresh)):
        assert torch.equal(a[0].weight_mask, b[0].weight_mask)
    assert again.steps == hook.steps


def test_gradually_pruned_student_in_a_run(smoke_run):
    run_dir, summary = smoke_run
    pruned = summary["student_pruned"]
    prunable = 64 * 256 + 256 * 10  # the mlp's two linear layers (8x8 digits, hidden 256)
    assert pruned["prunable"] == prunable and pruned["zeros"] == round(AMOUNT * prunable)
    assert pruned["sparsity"] == pytest.approx(AMOUNT, abs=1 / prunable)
    assert pruned["schedule"] == "gradual" and (pruned["start"], pruned["end"]) == (2, 2)
    assert pruned["best_epoch"] >= pruned["end"] and pruned["test_acc_best"] is not None
    for which in ("best", "last"):
        state = torch.load(run_dir / "checkpoints" / f"student_pruned_{which}.pt", weights_only=True)["model"]
        assert not any(k.endswith(("_orig", "_mask")) for k in state)
        zeros = sum(int((v == 0).sum()) for k, v in state.items() if k.endswith("weight"))
        assert zeros >= round(AMOUNT * prunable)
    traced = torch.jit.load(str(run_dir / "checkpoints" / "student_pruned.ts"))
    assert sum(int((p == 0).sum()) for p in traced.parameters()) >= round(AMOUNT * prunable)
    log = (run_dir / "kdrun.log").read_text()
    assert "student, KD, pruned" in log and "gradual, sparsity 50.0%" in log  # the results table's row


def test_oneshot_pruning_then_fine_tuning(smoke_run, tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(compression, "from_run", boom)  # a report that fails is a warning, not a failed run
    base = smoke_run[0].parent  # its stores: teacher and baseline are reused
    summary = smoke_inproc(base, tmp_path / "oneshot", "student.prune.amount=0.25", "student.prune.schedule=oneshot",
                           "student.prune.finetune_epochs=1", "trainer.num_threads=1", "compression=true")
    pruned = summary["student_pruned"]
    assert pruned["schedule"] == "oneshot" and pruned["epochs"] == 1 and pruned["finetune_lr"] == pytest.approx(0.005)
    assert pruned["zeros"] == round(0.25 * pruned["prunable"]) and pruned["test_acc_before_finetune"] is not None
    assert summary["status"] == "completed" and "compression failed: RuntimeError: boom" in summary["warnings"]
    assert "compression" not in summary and "export" not in summary
    state = torch.load(tmp_path / "oneshot" / "checkpoints" / "student_pruned_best.pt", weights_only=True)["model"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, message", [
    (["export=[torchscript,tflite]"], "export", "unknown value 'tflite'; choose one of: onnx, torchscript"),
    (["student.prune.amount=1.0"], "student.prune.amount", "must be in [0.0, 1.0), got 1.0"),
    (["student.prune.amount=-0.1"], "student.prune.amount", "must be in [0.0, 1.0), got -0.1"),
    (["student.prune.schedule=random"], "student.prune.schedule", "choose one of: gradual, oneshot"),
    (["student.prune.end=3"], "student.prune.end", "must be in [student.prune.start, trainer.epochs] = [2, 2]"),
    (["student.prune.amount=0.5", "mode=self"], "student.prune.amount", "mode=offline only"),
])
def test_bad_input_names_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as caught:
        to_object(compose_config("experiment=smoke", *overrides))
    assert caught.value.key == key and message in str(caught.value) and "\n" not in str(caught.value)


def test_onnx_without_the_onnx_package_is_refused_before_training(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^export: onnx export needs the onnx package.*kdrun\[export\]"):
        to_object(compose_config("experiment=smoke", "export=[onnx]"))
