"""Logit and box losses against hand-computed values, plain-loop re-implementations and known identities."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.losses import box_distill, kd_sigmoid, ld


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(p: float, q: float) -> float:
    """BCE of prediction probability p against soft target q."""
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def _logits(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = (2 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
    return student, teacher


def _assert_student_only(loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# kd_sigmoid


def test_kd_sigmoid_hand_value():
    s, t, tau = 0.3, -1.2, 2.0
    expected = tau**2 * _bce(_sigmoid(s / tau), _sigmoid(t / tau))
    value = kd_sigmoid(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), tau)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    qfl = kd_sigmoid(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), tau, beta=2.0)
    weight = abs(_sigmoid(s / tau) - _sigmoid(t / tau)) ** 2
    assert qfl.item() == pytest.approx(expected * weight, rel=1e-12)


@pytest.mark.parametrize("beta", [None, 2.0])
def test_kd_sigmoid_loop_and_reductions(beta):
    s, t = _logits(3, 4, 5)
    tau = 1.5
    loss = kd_sigmoid(s, t, tau, reduction="none", beta=beta)
    assert loss.shape == (3, 4, 5)
    values = []
    for x, y in zip(s.detach().flatten().tolist(), t.detach().flatten().tolist()):
        p, q = _sigmoid(x / tau), _sigmoid(y / tau)
        values.append(tau**2 * _bce(p, q) * (1.0 if beta is None else abs(p - q) ** beta))
    assert loss.flatten().tolist() == pytest.approx(values, rel=1e-9)
    assert kd_sigmoid(s, t, tau, "sum", beta).item() == pytest.approx(sum(values), rel=1e-9)
    mean = kd_sigmoid(s, t, tau, "mean", beta)
    assert mean.item() == pytest.approx(sum(values) / len(values), rel=1e-9)
    _assert_student_only(mean, s, t)


def test_kd_sigmoid_minimum_at_equality():
    _, t = _logits(50)
    tau = 2.0
    s = t.detach().clone().requires_grad_()
    loss = kd_sigmoid(s, t, tau, reduction="sum")
    entropy = sum(tau**2 * _bce(_sigmoid(y / tau), _sigmoid(y / tau)) for y in t.detach().tolist())
    assert loss.item() == pytest.approx(entropy, rel=1e-12)  # soft-target BCE: minimum = entropy, not 0
    loss.backward()
    assert s.grad.abs().max().item() < 1e-12
    for shift in (-0.1, 0.1):
        assert kd_sigmoid(s.detach() + shift, t, tau, reduction="sum").item() > loss.item()


def test_qfl_weight_zero_at_equality_and_not_detached():
    _, t = _logits(20)
    s = t.detach().clone().requires_grad_()
    loss = kd_sigmoid(s, t, 1.0, reduction="sum", beta=2.0)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.abs().max().item() == 0.0
    # the modulating factor is differentiated through (mmdet's quality_focal_loss): analytic = numerical gradient
    s2, t2 = _logits(6, seed=1)
    assert torch.autograd.gradcheck(lambda x: kd_sigmoid(x, t2.detach(), 2.0, "sum", beta=2.0), (s2,))


def test_kd_sigmoid_empty_mean_is_zero():
    assert kd_sigmoid(torch.zeros(0, 80), torch.zeros(0, 80)).item() == 0.0


# LD


def test_ld_hand_case_and_loop():
    # one distribution of 3 bins, T = 1: teacher logits log(1, 2, 5) → (0.125, 0.25, 0.625); student uniform
    teacher = torch.log(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    student = torch.zeros(3, dtype=torch.float64)
    kl = sum(p * math.log(p * 3) for p in (0.125, 0.25, 0.625))
    assert ld(student, teacher, temperature=1.0).item() == pytest.approx(kl / 3, rel=1e-12)  # mean over bins

    s, t = _logits(2, 4, 17)
    tau = 10.0
    per = ld(s, t, tau, reduction="none")
    assert per.shape == (2, 4)
    for i in range(2):
        for j in range(4):
            zs = [x / tau for x in s[i, j].tolist()]
            zt = [y / tau for y in t[i, j].tolist()]
            log_ns = math.log(sum(math.exp(z) for z in zs))
            log_nt = math.log(sum(math.exp(z) for z in zt))
            kl = sum(math.exp(b - log_nt) * ((b - log_nt) - (a - log_ns)) for a, b in zip(zs, zt))
            assert per[i, j].item() == pytest.approx(tau**2 * kl / 17, rel=1e-9)
    assert ld(s, t, tau, "sum").item() == pytest.approx(per.sum().item(), rel=1e-12)
    mean = ld(s, t, tau)
    assert mean.item() == pytest.approx(per.mean().item(), rel=1e-12)
    _assert_student_only(mean, s, t)


def test_ld_zero_at_equality():
    _, t = _logits(5, 4, 16)
    assert ld(t.detach().clone(), t).item() == 0.0
    assert ld(t.detach() + 3.0, t).item() == pytest.approx(0.0, abs=1e-12)  # softmax is shift-invariant
    assert ld(torch.zeros(0, 4, 16), torch.zeros(0, 4, 16)).item() == 0.0


# box_distill


def test_box_distill_hand_values():
    # pair 1: identical boxes; pair 2: (0,0,2,2) vs (1,1,3,3): IoU 1/7, hull 9, GIoU = 1/7 − 2/9
    student = torch.tensor([[4.0, 4.0, 6.0, 8.0], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[4.0, 4.0, 6.0, 8.0], [1.0, 1.0, 3.0, 3.0]], dtype=torch.float64, requires_grad=True)
    giou_loss = 1 - (1 / 7 - 2 / 9)
    l1 = (1 / 8 + 1 / 4 + 1 / 8 + 1 / 4) / 4  # image 4 high, 8 wide: x by 8, y by 4
    weights = torch.tensor([3.0, 1.0], dtype=torch.float64)

    out = box_distill(student, teacher, weights, image_size=(4, 8), iou_weight=1.0, l1_weight=1.0)
    assert out["giou"].item() == pytest.approx(giou_loss / 4, rel=1e-6)  # Σ w·(1 − GIoU) / Σ w
    assert out["l1"].item() == pytest.approx(l1 / 4, rel=1e-12)  # Σ w·|s − t| / (Σ w · 4)
    _assert_student_only(out["giou"] + out["l1"], student, teacher)

    plain = box_distill(student.detach(), teacher, image_size=(4, 8))  # defaults: 2.5 · GIoU, 0.5 · L1, mean
    assert plain["giou"].item() == pytest.approx(2.5 * giou_loss / 2, rel=1e-6)
    assert plain["l1"].item() == pytest.approx(0.5 * l1 / 2, rel=1e-12)

    none = box_distill(student.detach(), teacher, weights, image_size=(4, 8), iou_weight=1.0, reduction="none")
    assert none["giou"].shape == (2,) and none["l1"].shape == (2,)
    assert none["giou"].tolist() == pytest.approx([0.0, giou_loss], abs=1e-6)
    total = box_distill(student.detach(), teacher, weights, image_size=(4, 8), iou_weight=1.0, reduction="sum")
    assert total["giou"].item() == pytest.approx(giou_loss, rel=1e-6)

    grid = box_distill(student.detach(), teacher, weights, l1_weight=1.0)  # no image_size: coordinates as given
    assert grid["l1"].item() == pytest.approx(1.0 / 4, rel=1e-12)  # |s − t| = 1 on every coordinate of pair 2


def test_box_distill_giou_loop_on_batched_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 50
    student = torch.cat([xy, xy + 1 + torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 30], -1)
    xy = torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 50
    teacher = torch.cat([xy, xy + 1 + torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 30], -1)
    weights = torch.rand(2, 5, 1, generator=g, dtype=torch.float64)  # (..., 1) accepted

    num = den = 0.0
    for (a0, a1, a2, a3), (b0, b1, b2, b3), w in zip(
        student.view(-1, 4).tolist(), teacher.view(-1, 4).tolist(), weights.flatten().tolist()
    ):
        inter = max(0.0, min(a2, b2) - max(a0, b0)) * max(0.0, min(a3, b3) - max(a1, b1))
        union = (a2 - a0) * (a3 - a1) + (b2 - b0) * (b3 - b1) - inter
        hull = (max(a2, b2) - min(a0, b0)) * (max(a3, b3) - min(a1, b1))
        num += w * (1 - (inter / union - (hull - union) / hull))
        den += w
    out = box_distill(student, teacher, weights, image_size=(80, 80), iou_weight=1.0)
    assert out["giou"].item() == pytest.approx(num / den, rel=1e-6)


def test_box_distill_zero_weights_and_empty():
    s = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    t = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    out = box_distill(s, t, torch.zeros(1), image_size=(4, 4))
    assert out["giou"].item() == 0.0 and out["l1"].item() == 0.0
    empty = box_distill(torch.zeros(0, 4), torch.zeros(0, 4), image_size=(4, 4))
    assert empty["giou"].item() == 0.0 and empty["l1"].item() == 0.0
