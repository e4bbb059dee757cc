"""The maths of kdrun/losses/base.py against hand-written formulas.

Convention under test: L = (1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)),
KL summed over classes and averaged over the batch (``batchmean``).
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS

from kdrun.errors import ConfigError
from kdrun.losses.base import DistillationLoss, build, cross_entropy, kd_term
from kdrun.losses.options import CELossConfig
from kdrun.losses.options import KDLossConfig as LossConfig

torch.set_num_threads(THREADS)
B, K = 6, 10


def manual_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p_t || p_s) of the temperature-softened distributions, summed over classes, averaged over the batch,
    computed in float64 from the definition."""
    s, t = student.double() / T, teacher.double() / T
    p_t = torch.exp(t) / torch.exp(t).sum(dim=1, keepdim=True)
    p_s = torch.exp(s) / torch.exp(s).sum(dim=1, keepdim=True)
    per_sample = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1)
    return per_sample.mean()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, K, generator=g) * 3
    teacher = torch.randn(B, K, generator=g) * 3
    labels = torch.randint(0, K, (B,), generator=g)
    return student, teacher, labels


def kd_loss(T=4.0, alpha=0.9, name="kd") -> "DistillationLoss":
    return build(name, T=T, alpha=alpha)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 0.5])
def test_kd_term_is_T2_times_batchmean_kl(logits, T):
    student, teacher, _ = logits
    expected = T * T * manual_kl(student, teacher, T)
    got = kd_term(student, teacher, T)
    assert got.dim() == 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_kd_term_is_not_mean_over_classes(logits):
    """'batchmean' sums over classes: a mean over all B*K elements would be K times smaller."""
    student, teacher, _ = logits
    T = 4.0
    per_element_mean = T * T * manual_kl(student, teacher, T) / K
    got = kd_term(student, teacher, T).double()
    assert not torch.isclose(got, per_element_mean, rtol=1e-3)
    torch.testing.assert_close(got / K, per_element_mean, rtol=1e-5, atol=1e-7)


def test_temperature_squared_scaling(logits):
    student, teacher, _ = logits
    kd2, kd4 = kd_term(student, teacher, 2.0).double(), kd_term(student, teacher, 4.0).double()
    kl2, kl4 = manual_kl(student, teacher, 2.0), manual_kl(student, teacher, 4.0)
    torch.testing.assert_close(kd2, 4 * kl2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd4, 16 * kl4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd4 / kd2, 16 * kl4 / (4 * kl2), rtol=1e-5, atol=1e-6)


def test_full_loss_combines_ce_and_kd(logits):
    student, teacher, labels = logits
    loss, parts = kd_loss(T=4.0, alpha=0.9)(student, teacher, labels)
    ce = F.cross_entropy(student.double(), labels)
    expected = 0.1 * ce + 0.9 * 16 * manual_kl(student, teacher, 4.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"].double(), ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts["kd"].double(), 16 * manual_kl(student, teacher, 4.0), rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_exactly_cross_entropy(logits):
    student, teacher, labels = logits
    fn = kd_loss(T=4.0, alpha=0.0)
    assert fn.needs_teacher is False
    loss, parts = fn(student, teacher, labels)
    assert torch.equal(loss, F.cross_entropy(student, labels))
    assert torch.equal(parts["kd"], torch.zeros(()))
    loss_no_teacher, _ = fn(student, None, labels)  # the teacher is not needed at all
    assert torch.equal(loss_no_teacher, loss)


def test_ce_loss_needs_no_teacher(logits):
    student, _, labels = logits
    for fn in (kd_loss(name="ce", T=1.0, alpha=0.0), cross_entropy()):
        assert fn.needs_teacher is False
        loss, _ = fn(student, None, labels)
        assert torch.equal(loss, F.cross_entropy(student, labels))


def test_alpha_one_is_exactly_the_kd_term(logits):
    student, teacher, labels = logits
    fn = kd_loss(T=4.0, alpha=1.0)
    assert fn.needs_teacher is True
    loss, parts = fn(student, teacher, labels)
    assert torch.equal(loss, kd_term(student, teacher, 4.0))
    assert torch.equal(loss, parts["kd"])


def test_kd_needs_teacher_when_alpha_positive():
    assert kd_loss(alpha=0.5).needs_teacher is True
    assert kd_loss(alpha=1e-6).needs_teacher is True


def test_equal_logits_give_zero_kd(logits):
    student, _, labels = logits
    assert kd_term(student, student.clone(), 4.0).abs().item() < 1e-6
    loss, parts = kd_loss(alpha=1.0)(student, student.clone(), labels)
    assert abs(loss.item()) < 1e-6 and abs(parts["kd"].item()) < 1e-6


def test_kd_is_positive_for_different_logits(logits):
    student, teacher, _ = logits
    assert kd_term(student, teacher, 4.0).item() > 1e-4


def test_reduction_does_not_depend_on_batch_size(logits):
    student, teacher, labels = logits
    fn = kd_loss(T=4.0, alpha=0.9)
    single, single_parts = fn(student, teacher, labels)
    double, double_parts = fn(torch.cat([student, student]), torch.cat([teacher, teacher]), torch.cat([labels, labels]))
    torch.testing.assert_close(double, single, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(double_parts["kd"], single_parts["kd"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(double_parts["ce"], single_parts["ce"], rtol=1e-6, atol=1e-6)


def test_gradient_flows_to_student_only(logits):
    student, teacher, labels = logits
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)  # even if the caller forgot to freeze it
    loss, _ = kd_loss(T=4.0, alpha=0.9)(student, teacher, labels)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum().item() > 0
    assert teacher.grad is None or teacher.grad.abs().sum().item() == 0


def test_student_gradient_matches_autograd_of_the_formula(logits):
    student, teacher, labels = logits
    s1 = student.clone().double().requires_grad_(True)
    ref = 0.5 * F.cross_entropy(s1, labels) + 0.5 * 4.0 * manual_kl(s1, teacher, 2.0)
    ref.backward()
    s2 = student.clone().requires_grad_(True)
    loss, _ = kd_loss(T=2.0, alpha=0.5)(s2, teacher, labels)
    loss.backward()
    torch.testing.assert_close(s2.grad.double(), s1.grad, rtol=1e-4, atol=1e-6)


def test_formula_strings():
    assert kd_loss(T=4.0, alpha=0.9).formula() == "L = 0.1·CE + 0.9·16·KL(T=4)"
    assert kd_loss(T=2.0, alpha=0.5).formula() == "L = 0.5·CE + 0.5·4·KL(T=2)"
    assert kd_loss(T=4.0, alpha=1.0).formula() == "L = 1·16·KL(T=4)"
    assert kd_loss(name="ce", T=1.0, alpha=0.0).formula() == "L = CE (no teacher term)"
    assert kd_loss(T=4.0, alpha=0.0).formula() == "L = CE (no teacher term)"


@pytest.mark.parametrize("alpha", [1.5, -0.1, 1.0001])
def test_schema_rejects_alpha_out_of_range(alpha):
    with pytest.raises(ConfigError) as err:
        LossConfig(name="kd", T=4.0, alpha=alpha)
    assert err.value.key == "loss.alpha"
    assert str(err.value).startswith("loss.alpha")


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_schema_rejects_non_positive_temperature(T):
    with pytest.raises(ConfigError) as err:
        LossConfig(name="kd", T=T, alpha=0.9)
    assert err.value.key == "loss.T"
    assert str(err.value).startswith("loss.T")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_schema_accepts_alpha_bounds(alpha):
    assert LossConfig(name="kd", T=4.0, alpha=alpha).alpha == alpha


def test_schema_rejects_ce_with_teacher_weight_and_unknown_loss():
    with pytest.raises(ConfigError, match="loss.alpha"):
        CELossConfig(alpha=0.5)
    with pytest.raises(ConfigError) as err:
        build("nope", T=4.0, alpha=0.9)
    assert err.value.key == "loss" and "kd" in str(err.value) and "ce" in str(err.value)
