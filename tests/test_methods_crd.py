"""loss=crd against RepDistiller's CRDLoss (its code, copied below as the reference): values, gradients, the memory
update and the constant Z with the same weights, memory and negatives; the 'exact' negatives; the refusals; and
runs: offline with a conv and an mlp student, mode=self, and a real `kdrun` SIGKILLed and resumed."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import THREADS, read_jsonl, smoke_inproc
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.methods.crd import CRDLoss, bank_mb, nce

torch.set_num_threads(THREADS)

eps = 1e-7


class ContrastMemory(nn.Module):
    """RepDistiller crd/memory.py, verbatim but for the device line (``self.multinomial.cuda()``)."""

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5):
        super(ContrastMemory, self).__init__()
        self.nLem = outputSize
        self.unigrams = torch.ones(self.nLem)
        self.multinomial = AliasMethod(self.unigrams)
        self.K = K

        self.register_buffer('params', torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1. / math.sqrt(inputSize / 3)
        self.register_buffer('memory_v1', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('memory_v2', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))

    def forward(self, v1, v2, y, idx=None):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()

        momentum = self.params[4].item()
        batchSize = v1.size(0)
        outputSize = self.memory_v1.size(0)
        inputSize = self.memory_v1.size(1)

        # original score computation
        if idx is None:
            idx = self.multinomial.draw(batchSize * (self.K + 1)).view(batchSize, -1)
            idx.select(1, 0).copy_(y.data)
        # sample
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
        out_v2 = torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1))
        out_v2 = torch.exp(torch.div(out_v2, T))
        # sample
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
        out_v1 = torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1))
        out_v1 = torch.exp(torch.div(out_v1, T))

        # set Z if haven't been set yet
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * outputSize
            Z_v1 = self.params[2].clone().detach().item()
            print("normalization constant Z_v1 is set to {:.1f}".format(Z_v1))
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * outputSize
            Z_v2 = self.params[3].clone().detach().item()
            print("normalization constant Z_v2 is set to {:.1f}".format(Z_v2))

        # compute out_v1, out_v2
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()

        # update memory
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v1, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v1 = l_pos.div(l_norm)
            self.memory_v1.index_copy_(0, y, updated_v1)

            ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(v2, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v2 = ab_pos.div(ab_norm)
            self.memory_v2.index_copy_(0, y, updated_v2)

        return out_v1, out_v2


class AliasMethod(object):
    """RepDistiller crd/memory.py, verbatim (ContrastMemory builds one; the tests give the negatives)."""

    def __init__(self, probs):

        if probs.sum() > 1:
            probs.div_(probs.sum())
        K = len(probs)
        self.prob = torch.zeros(K)
        self.alias = torch.LongTensor([0] * K)

        smaller = []
        larger = []
        for kk, prob in enumerate(probs):
            self.prob[kk] = K * prob
            if self.prob[kk] < 1.0:
                smaller.append(kk)
            else:
                larger.append(kk)

        while len(smaller) > 0 and len(larger) > 0:
            small = smaller.pop()
            large = larger.pop()

            self.alias[small] = large
            self.prob[large] = (self.prob[large] - 1.0) + self.prob[small]

            if self.prob[large] < 1.0:
                smaller.append(large)
            else:
                larger.append(large)

        for last_one in smaller + larger:
            self.prob[last_one] = 1


class ReferenceCRDLoss(nn.Module):
    """RepDistiller crd/criterion.py CRDLoss, verbatim."""

    def __init__(self, opt):
        super(ReferenceCRDLoss, self).__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.criterion_t = ContrastLoss(opt.n_data)
        self.criterion_s = ContrastLoss(opt.n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        f_s = self.embed_s(f_s)
        f_t = self.embed_t(f_t)
        out_s, out_t = self.contrast(f_s, f_t, idx, contrast_idx)
        s_loss = self.criterion_s(out_s)
        t_loss = self.criterion_t(out_t)
        loss = s_loss + t_loss
        return loss


class ContrastLoss(nn.Module):
    """RepDistiller crd/criterion.py, verbatim."""

    def __init__(self, n_data):
        super(ContrastLoss, self).__init__()
        self.n_data = n_data

    def forward(self, x):
        bsz = x.shape[0]
        m = x.size(1) - 1

        # noise distribution
        Pn = 1 / float(self.n_data)

        # loss for positive pair
        P_pos = x.select(1, 0)
        log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()

        # loss for K negative pair
        P_neg = x.narrow(1, 1, m)
        log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()

        loss = - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz

        return loss


class Embed(nn.Module):
    """RepDistiller crd/criterion.py, verbatim."""

    def __init__(self, dim_in=1024, dim_out=128):
        super(Embed, self).__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        x = self.l2norm(x)
        return x


class Normalize(nn.Module):
    """RepDistiller crd/criterion.py, verbatim."""

    def __init__(self, power=2):
        super(Normalize, self).__init__()
        self.power = power

    def forward(self, x):
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1. / self.power)
        out = x.div(norm)
        return out


N, CLASSES, B = 60, 4, 8


def pair(s_shape=(B, 12), t_shape=(B, 6, 2, 2), feat_dim=16, nce_k=10):
    """Our loss and the reference on the same weights and memory, for a train split of N samples."""
    torch.manual_seed(0)
    labels = torch.arange(N) % CLASSES
    fs, ft = torch.randn(s_shape), torch.randn(t_shape)
    ours = CRDLoss(feat_dim=feat_dim, nce_k=nce_k)
    ours.setup([fs], [ft])
    ours.setup_data(labels)
    opt = SimpleNamespace(s_dim=fs[0].numel(), t_dim=ft[0].numel(), feat_dim=feat_dim, nce_k=nce_k, nce_t=0.07,
                          nce_m=0.5, n_data=N)
    ref = ReferenceCRDLoss(opt)
    ours.embed_s.load_state_dict(ref.embed_s.linear.state_dict())
    ours.embed_t.load_state_dict(ref.embed_t.linear.state_dict())
    ours.memory_s.copy_(ref.contrast.memory_v1)  # v1: the student's projections
    ours.memory_t.copy_(ref.contrast.memory_v2)
    return ours, ref, s_shape, t_shape


@pytest.mark.parametrize("shapes, nce_k", [
    (((B, 12), (B, 6, 2, 2)), 10),
    (((B, 5), (B, 9)), 10),
    (((B, 12), (B, 6, 2, 2)), 5),  # the bank more than 8 x the rows drawn: scores from the gathered rows
], ids=["flat-map", "flat-flat", "gathered"])
def test_crd_equals_the_reference_in_value_gradient_memory_and_z(shapes, nce_k):
    ours, ref, s_shape, t_shape = pair(*shapes, nce_k=nce_k)
    for step in range(3):  # the first sets Z; the later ones read the updated banks
        index = torch.randperm(N)[:B]
        rows = ours.negatives(index)
        fs, ft = torch.randn(s_shape, requires_grad=True), torch.randn(t_shape)
        before = ours.memory_s.clone()
        expected = ref(fs, ft, index, rows).squeeze()
        grads_ref = torch.autograd.grad(expected, [fs, *ref.embed_s.parameters(), *ref.embed_t.parameters()])
        value = ours.contrast(fs, ft, index, rows)
        grads = torch.autograd.grad(value, [fs, *ours.embed_s.parameters(), *ours.embed_t.parameters()])
        torch.testing.assert_close(value, expected)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref)
        torch.testing.assert_close(ours.memory_s, ref.contrast.memory_v1)  # momentum 0.5, renormalised
        torch.testing.assert_close(ours.memory_t, ref.contrast.memory_v2)
        torch.testing.assert_close(ours.z, ref.contrast.params[2:4])
        others = torch.ones(N, dtype=torch.bool).index_fill_(0, index, False)
        assert torch.equal(ours.memory_s[others], before[others]) and not torch.equal(ours.memory_s[index],
                                                                                       before[index])
        torch.testing.assert_close(ours.memory_s[index].norm(dim=1), torch.ones(B))  # the batch's rows: unit norm


def test_z_is_set_once_from_the_first_batch_as_the_reference_defines_it():
    ours, _, s_shape, t_shape = pair()
    index = torch.arange(B)
    rows = ours.negatives(index)
    fs, ft = torch.randn(s_shape), torch.randn(t_shape)
    vs = nn.functional.normalize(ours.embed_s(fs.flatten(1)), dim=1)
    vt = nn.functional.normalize(ours.embed_t(ft.flatten(1)), dim=1)
    z_s = torch.exp((ours.memory_t[rows] @ vs[:, :, None]).squeeze(2) / 0.07).mean() * N  # Z = mean(out) * n_data
    z_t = torch.exp((ours.memory_s[rows] @ vt[:, :, None]).squeeze(2) / 0.07).mean() * N
    ours.contrast(fs, ft, index, rows)
    torch.testing.assert_close(ours.z, torch.stack([z_s, z_t]).detach())
    first = ours.z.clone()
    ours.contrast(torch.randn(s_shape), torch.randn(t_shape), index + B, ours.negatives(index + B))
    assert torch.equal(ours.z, first)  # never again


def test_nce_by_hand_with_one_negative():
    p = torch.tensor([[2.0, 0.5]])  # K = 1, n_data = 2: K·P_n = 0.5
    expected = -(math.log(2 / (2 + 0.5 + 1e-7)) + math.log(0.5 / (0.5 + 0.5 + 1e-7)))
    assert nce(p, 2).item() == pytest.approx(expected, rel=1e-6)


def test_negatives_are_distinct_samples_of_other_classes_and_seeded():
    ours, *_ = pair(nce_k=N - N // CLASSES)  # every negative there is
    index = torch.tensor([0, 1, 2, 7])
    torch.manual_seed(3)
    rows = ours.negatives(index)
    assert rows.shape == (4, 1 + 45) and torch.equal(rows[:, 0], index)
    labels = ours.labels
    for i, row in zip(index, rows):
        negatives = row[1:]
        assert len(set(negatives.tolist())) == 45 and not (labels[negatives] == labels[i]).any()
    torch.manual_seed(3)
    assert torch.equal(ours.negatives(index), rows)


def test_the_crd_loss_adds_ce_kd_and_beta_times_the_term_and_keeps_its_state():
    ours, *_ = pair()
    s, t, y = torch.randn(B, 10), torch.randn(B, 10), torch.randint(0, 10, (B,))
    fs, ft = [torch.randn(B, 12)], [torch.randn(B, 6, 2, 2)]
    value, parts = ours(s, t, y, student_features=fs, teacher_features=ft, index=torch.arange(B))
    torch.testing.assert_close(value, nn.functional.cross_entropy(s, y) + 0.8 * parts["feat"])
    assert ours.formula() == "L = CE + 0.8·(nce_s + nce_t)(K=10, τ=0.07)"
    assert set(ours.state_dict()) == {"memory_s", "memory_t", "z", "embed_s.weight", "embed_s.bias",
                                      "embed_t.weight", "embed_t.bias"}
    with pytest.raises(RuntimeError, match="index="):
        ours(s, t, y, student_features=fs, teacher_features=ft)


def test_setup_data_refuses_too_many_negatives_and_banks_over_the_budget():
    loss = CRDLoss(nce_k=46)
    with pytest.raises(ConfigError, match=r"^loss.nce_k: must be at most 45 .* got 46$"):
        loss.setup_data(torch.arange(N) % CLASSES)
    assert bank_mb(50000, 128) == pytest.approx(48.828125)  # CIFAR-100's train split: 2 x 50000 x 128 float32
    with pytest.raises(ConfigError, match=r"^teacher.cache_budget_mb: .* 2 memory banks of 60 x 128 float32 = "):
        CRDLoss(nce_k=8).setup_data(torch.arange(N) % CLASSES, budget_mb=0.01)


def test_more_than_one_layer_pair_is_refused():
    with pytest.raises(ConfigError, match="^loss.student_layers: loss=crd contrasts one layer pair, got 2"):
        CRDLoss().setup([torch.randn(2, 3)] * 2, [torch.randn(2, 3)] * 2)


CNN = ("student=cnn", "student.args.channels=8")
SMALL = ("trainer.num_threads=1", "loss=crd", "loss.nce_k=64", "baseline=false")


@pytest.mark.parametrize("student, mode", [
    (CNN, ()),
    (("student=mlp",), ()),  # its hidden layer is the classifier's input
    (CNN, ("mode=self", "mode.generations=1", "mode.ensemble=false")),
], ids=["offline-cnn", "offline-mlp", "self"])
def test_crd_runs(smoke_stores, tmp_path, student, mode):
    summary = smoke_inproc(smoke_stores, tmp_path / "run", *student, *SMALL, *mode)
    assert summary["status"] == "completed" and summary["loss"]["name"] == "crd"
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
    saved = torch.load(tmp_path / "run" / "checkpoints" / "student_last.pt", map_location="cpu", weights_only=True)
    state = saved["loss_state"]
    assert state["memory_s"].shape == state["memory_t"].shape == (summary["dataset"]["train"], 128)
    assert (state["z"] > 0).all() and summary["student"]["loss_params"] > 0


@pytest.mark.parametrize("override, key", [
    ("loss.nce_k=16384", "loss.nce_k"),  # the default: more than digits has
    ("teacher.cache_budget_mb=0.1", "teacher.cache_budget_mb"),
    ("trainer.devices=2", "trainer.devices"),
])
def test_crd_refusals_name_the_key(smoke_stores, tmp_path, override, key):
    with pytest.raises(ConfigError) as caught:
        smoke_inproc(smoke_stores, tmp_path / "run", *CNN, *SMALL, override)
    assert str(caught.value).startswith(f"{key}: ") and "\n" not in str(caught.value)


def test_fit_hands_a_loss_the_train_labels_before_the_optimizer_is_built():
    """The framework's entry point for a loss with per-sample state (crd's banks): ``setup_data(train labels)``, and
    what it builds trains with the student."""
    from kdrun.schema import OptimConfig, SchedConfig
    from kdrun.train.loop import Recipe, _start

    class PerSample(nn.Module):
        needs_teacher = False

        def setup_data(self, labels):
            self.seen, self.w = labels, nn.Parameter(torch.zeros(len(labels)))

    data = SimpleNamespace(train=SimpleNamespace(y=torch.arange(5)))
    loss = PerSample()
    state, _ = _start(nn.Linear(2, 2), data, Recipe(1, 2, OptimConfig(), SchedConfig(), 0), loss, None)
    assert loss.seen is data.train.y
    assert any(p is loss.w for group in state.opt.param_groups for p in group["params"])


@pytest.mark.e2e
@pytest.mark.parametrize("method", [("loss=crd", "loss.nce_k=64"),
                                    ("loss=vid", "student=cnn", "student.args.channels=8")], ids=["crd", "vid"])
def test_a_learned_method_resumes_after_sigkill_bit_identically(tmp_path, method):
    """A real `kdrun` killed (SIGKILL) while the student trains with crd (embeddings, memory banks, Z) or vid
    (regressors, variances), resumed with `kdrun resume=DIR`: the student's weights and the loss's state, best and
    last, are an uninterrupted run's."""
    from test_resume import kill_at, resume_and_compare

    config = ("experiment=smoke", "trainer.epochs=12", "trainer.num_threads=1", *method, "baseline=false")
    killed = kill_at(tmp_path, config, "student", 3)
    saved = torch.load(killed / "checkpoints" / "student_resume.pt", map_location="cpu", weights_only=True)
    assert 2 <= saved["epoch"] < 12 and saved["loss"]  # the loss's state is in the resume checkpoint
    if method[0] == "loss=crd":
        assert saved["loss"]["z"].gt(0).all()  # the banks' normalisation constant, set on the first batch
    resume_and_compare(tmp_path, killed, config, "student")
    for which in ("last", "best"):
        a, b = (torch.load(run / "checkpoints" / f"student_{which}.pt", map_location="cpu", weights_only=True)
                for run in (killed, tmp_path / "whole"))
        assert a["loss_state"].keys() == b["loss_state"].keys() and a["loss_state"]
        for name in a["loss_state"]:
            assert torch.equal(a["loss_state"][name], b["loss_state"][name]), f"{which} loss_state {name} differs"


def test_crd_runs_on_a_streamed_image_folder(smoke_stores, tmp_path):
    """Streamed batches carry their indices into the train split as in-memory ones do: the banks need no refusal."""
    from test_data import _write_image_folder

    root = _write_image_folder(tmp_path / "images", per_class=12)
    summary = smoke_inproc(smoke_stores, tmp_path / "run", *CNN, *SMALL, "dataset=imagefolder", f"dataset.root={root}",
                           "dataset.image_size=8", "dataset.stream=true", "dataset.num_workers=0",
                           "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]", "loss.nce_k=8")
    assert summary["status"] == "completed" and summary["dataset"]["train"] >= 20
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "student"]
    assert records and all(r["train/loss_feat"] > 0 for r in records), records
