"""The logit losses of kdrun/losses/logit.py (mse, soft_ce, hard, dkd, dist, standardize) against hand
computations: small tensors, float64 formulas written from the papers' definitions, one sample at a time."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS, compose_config, read_json, read_jsonl, smoke_inproc
from omegaconf import OmegaConf

from kdrun.errors import ConfigError
from kdrun.losses.base import build, from_config, kd_term, standardize
from kdrun.losses.options import DISTLossConfig, DKDLossConfig, HardLossConfig, KDLossConfig, MSELossConfig

torch.set_num_threads(THREADS)
NEW = ["mse", "soft_ce", "hard", "dkd", "dist"]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3, torch.tensor([0, 3, 1, 2, 3])


def probs(z: torch.Tensor, T: float) -> torch.Tensor:
    e = torch.exp(z.double() / T)
    return e / e.sum(dim=1, keepdim=True)


def kl(p, q) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


def test_mse_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([2, 0])
    loss, parts = build("mse", alpha=0.25)(s, t, y)
    mse = (0 + 4 + 0 + 1 + 1 + 1) / 6  # mean over batch AND classes
    ce = F.cross_entropy(s.double(), y)
    torch.testing.assert_close(parts["kd"].double(), torch.tensor(mse, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), 0.75 * ce + 0.25 * mse, rtol=1e-6, atol=1e-6)


def test_hard_uses_the_teachers_argmax():
    s = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 2.0]])  # argmax: 1, 0
    y = torch.tensor([2, 1])
    loss, parts = build("hard", alpha=0.5)(s, t, y)
    log_p = torch.log(probs(s, 1.0))
    ce_true = -(log_p[0, 2] + log_p[1, 1]) / 2
    ce_teacher = -(log_p[0, 1] + log_p[1, 0]) / 2
    torch.testing.assert_close(parts["kd"].double(), ce_teacher, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), 0.5 * ce_true + 0.5 * ce_teacher, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_ce_is_kd_plus_teacher_entropy(logits, T):
    s, t, y = logits
    p_t, p_s = probs(t, T), probs(s, T)
    soft = -(p_t * torch.log(p_s)).sum(dim=1).mean() * T * T
    entropy = -(p_t * torch.log(p_t)).sum(dim=1).mean() * T * T
    loss, parts = build("soft_ce", T=T, alpha=0.9)(s, t, y)
    torch.testing.assert_close(parts["kd"].double(), soft, rtol=1e-5, atol=1e-5)
    kd_loss, kd_parts = build("kd", T=T, alpha=0.9)(s, t, y)
    torch.testing.assert_close((loss - kd_loss).double(), 0.9 * entropy, rtol=1e-4, atol=1e-4)


def dkd_by_hand(s, t, y, T, alpha, beta):
    """TCKD and NCKD per sample from the definitions (Zhao et al. 2022, eqs. 1-4), batch mean, T²-scaled."""
    p_s, p_t = probs(s, T).tolist(), probs(t, T).tolist()
    tckd = nckd = 0.0
    for ps, pt, c in zip(p_s, p_t, y.tolist()):
        tckd += kl([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]])
        rest_t = [v / (1 - pt[c]) for k, v in enumerate(pt) if k != c]
        rest_s = [v / (1 - ps[c]) for k, v in enumerate(ps) if k != c]
        nckd += kl(rest_t, rest_s)
    n = len(y)
    return T * T * tckd / n, T * T * nckd / n, alpha * T * T * tckd / n + beta * T * T * nckd / n


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_by_hand_with_warmup(logits, T):
    s, t, y = logits
    loss_fn = build("dkd", T=T, alpha=1.0, beta=8.0, warmup=20, ce_weight=0.5)
    _, _, kd = dkd_by_hand(s, t, y, T, 1.0, 8.0)
    ce = float(F.cross_entropy(s.double(), y))
    for epoch, warm in [(1, 1 / 20), (5, 0.25), (20, 1.0), (30, 1.0)]:
        loss_fn.set_epoch(epoch)
        loss, parts = loss_fn(s, t, y)
        assert float(parts["kd"]) == pytest.approx(warm * kd, rel=1e-4)
        assert float(loss) == pytest.approx(0.5 * ce + warm * kd, rel=1e-4)
    assert "8·NCKD" in loss_fn.formula() and "min(epoch/20, 1)" in loss_fn.formula()


def test_dkd_decomposes_kd(logits):
    """The paper's identity KL(p_t || p_s) = TCKD + (1 - p_t[target])·NCKD, per sample (checks the hand code)."""
    s, t, y = logits
    for i in range(len(y)):
        tckd, nckd, _ = dkd_by_hand(s[i:i + 1], t[i:i + 1], y[i:i + 1], 1.0, 1, 1)
        pt = float(probs(t[i:i + 1], 1.0)[0, y[i]])
        assert float(kd_term(s[i:i + 1], t[i:i + 1], 1.0)) == pytest.approx(tckd + (1 - pt) * nckd, rel=1e-4)


def test_dist_by_hand(logits):
    s, t, y = logits
    T = 4.0
    p_s, p_t = probs(s, T).numpy(), probs(t, T).numpy()
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(len(y))])
    intra = 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(p_s.shape[1])])
    loss, parts = build("dist", T=T, alpha=0.5, beta=2.0, gamma=0.5)(s, t, y)
    term = T * T * (2.0 * inter + 0.5 * intra)
    assert float(parts["kd"]) == pytest.approx(term, rel=1e-4)
    assert float(loss) == pytest.approx(0.5 * float(F.cross_entropy(s.double(), y)) + 0.5 * term, rel=1e-4)


def test_standardize_z_scores_each_sample(logits):
    s, t, y = logits
    z = lambda a: (a.double() - a.double().mean(1, keepdim=True)) / a.double().std(1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(standardize(s).double(), z(s), rtol=1e-5, atol=1e-5)
    T = 2.0
    _, kd_parts = build("kd", T=T, alpha=0.9, standardize=True)(s, t, y)
    torch.testing.assert_close(kd_parts["kd"].double(), kd_term(z(s), z(t), T).double(), rtol=1e-4, atol=1e-5)
    _, sce_parts = build("soft_ce", T=T, alpha=0.9, standardize=True)(s, t, y)
    p_t, p_s = probs(z(t), T), probs(z(s), T)
    torch.testing.assert_close(sce_parts["kd"].double(), -(p_t * torch.log(p_s)).sum(1).mean() * T * T,
                               rtol=1e-4, atol=1e-5)
    dkd = build("dkd", T=T, warmup=0, standardize=True)
    _, _, expected = dkd_by_hand(z(s), z(t), y, T, 1.0, 8.0)
    assert float(dkd(s, t, y)[1]["kd"]) == pytest.approx(expected, rel=1e-4)


def test_kd_without_standardize_is_unchanged(logits):
    s, t, y = logits
    loss, parts = from_config(KDLossConfig(T=4.0, alpha=0.9))(s, t, y)
    ce = F.cross_entropy(s.float(), y)
    kd = kd_term(s, t, 4.0)
    assert torch.equal(parts["kd"], kd) and torch.equal(loss, (1 - 0.9) * ce + 0.9 * kd)


def test_from_config_passes_schema_fields():
    loss = from_config(DKDLossConfig(beta=2.0, warmup=5, ce_weight=0.5, standardize=True))
    assert (loss.beta, loss.warmup, loss.ce_weight, loss.standardize) == (2.0, 5, 0.5, True)
    assert from_config(DISTLossConfig(gamma=3.0)).gamma == 3.0


@pytest.mark.parametrize("make,key", [
    (lambda: DKDLossConfig(beta=-1.0), "loss.beta"), (lambda: DKDLossConfig(alpha=-0.1), "loss.alpha"),
    (lambda: DKDLossConfig(warmup=-1), "loss.warmup"), (lambda: DKDLossConfig(T=0.0), "loss.T"),
    (lambda: DISTLossConfig(gamma=-1.0), "loss.gamma"), (lambda: MSELossConfig(alpha=1.5), "loss.alpha"),
    (lambda: HardLossConfig(alpha=-0.5), "loss.alpha"), (lambda: DISTLossConfig(beta=math.inf), "loss.beta"),
])
def test_schemas_check_ranges(make, key):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == key


def test_dkd_alpha_may_exceed_one():
    assert DKDLossConfig(alpha=2.0, beta=8.0).alpha == 2.0


@pytest.mark.parametrize("name", NEW)
def test_each_loss_composes_with_its_schema(name):
    conf = OmegaConf.to_object(compose_config(f"loss={name}"))
    assert conf.loss.name == name
    assert from_config(conf.loss).name == name


@pytest.mark.parametrize("loss", ["soft_ce", "dkd", "loss.standardize=true"])
def test_semi_refuses_other_losses(loss):
    overrides = ["loss=kd", loss] if loss.startswith("loss.") else [f"loss={loss}"]
    with pytest.raises(ConfigError) as err:
        OmegaConf.to_object(compose_config("mode=semi", *overrides))
    assert err.value.key == "loss" and "mode=semi" in str(err.value)


@pytest.mark.parametrize("name", NEW)
def test_each_loss_runs_end_to_end(tmp_path, name):
    extra = ["loss.warmup=2"] if name == "dkd" else []
    summary = smoke_inproc(tmp_path, tmp_path / "run", f"loss={name}", "teacher.cache=on", *extra)
    assert summary["status"] == "completed" and summary["loss"]["name"] == name
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("stage") == "student"]
    assert records and all(math.isfinite(r["train/loss"]) for r in records)
    assert summary["teacher"]["cache"]["used"]  # the logit cache serves every logit loss


def test_dkd_in_self_mode(tmp_path):
    summary = smoke_inproc(tmp_path, tmp_path / "run", "mode=self", "mode.generations=1", "loss=dkd",
                           "loss.standardize=true")
    assert summary["status"] == "completed" and read_json(tmp_path / "run" / "summary.json")["loss"]["name"] == "dkd"


def test_fit_tells_the_loss_each_epoch(tmp_path, monkeypatch):
    """engine.fit calls ``set_epoch`` at the start of each epoch of the stage whose loss has it (dkd's warm-up)."""
    from kdrun.losses.logit import DKDLoss

    seen = []
    original = DKDLoss.set_epoch
    monkeypatch.setattr(DKDLoss, "set_epoch", lambda self, epoch: (seen.append(epoch), original(self, epoch)))
    smoke_inproc(tmp_path, tmp_path / "run", "loss=dkd", "loss.warmup=2")
    assert seen == [1, 2]
