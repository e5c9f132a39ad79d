"""Feature losses against hand-computed values, plain-loop numpy re-implementations of the published formulas,
and known identities; never against the function itself on the same inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detkd.losses import FGDLoss, MGDLoss, cwd, fgd_masks, fitnet, pkd, score_weighted_l2


def _pair(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    return student, teacher


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _assert_student_only(loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# FitNet


def test_fitnet_is_mean_squared_error():
    s, t = _pair(2, 3, 4, 5)
    a, b = s.detach().numpy(), t.detach().numpy()
    expected = sum((x - y) ** 2 for x, y in zip(a.ravel(), b.ravel())) / a.size
    loss = fitnet(s, t)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    _assert_student_only(loss, s, t)


# CWD


def test_cwd_hand_case():
    # teacher logits log(1..4): softmax (0.1, 0.2, 0.3, 0.4); student 0: uniform 0.25
    teacher = torch.log(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64))
    student = torch.zeros_like(teacher)
    expected = sum(p * math.log(p / 0.25) for p in (0.1, 0.2, 0.3, 0.4))
    assert cwd(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_cwd_matches_loop_formula():
    s, t = _pair(2, 3, 4, 5)
    tau = 2.0
    a, b = s.detach().numpy(), t.detach().numpy()
    n, c = a.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            p_t, p_s = _softmax(b[i, j].ravel() / tau), _softmax(a[i, j].ravel() / tau)
            total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = tau**2 / (n * c) * total
    loss = cwd(s, t, tau=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    _assert_student_only(loss, s, t)


def test_cwd_zero_only_at_equality():
    s, t = _pair(2, 3, 4, 5)
    assert cwd(t.detach().clone(), t).item() == 0.0
    assert cwd(s, t).item() > 0
    # a per-channel constant shift leaves every softmax unchanged
    assert cwd(t.detach() + torch.arange(3.0, dtype=torch.float64).view(1, 3, 1, 1), t).item() == pytest.approx(
        0.0, abs=1e-12
    )


# PKD


def _pkd_loop(a: np.ndarray, b: np.ndarray) -> float:
    n, c, h, w = a.shape
    total = 0.0
    for j in range(c):
        xs, xt = a[:, j].ravel(), b[:, j].ravel()
        m = xs.size
        mean_s, mean_t = sum(xs) / m, sum(xt) / m
        std_s = math.sqrt(sum((x - mean_s) ** 2 for x in xs) / (m - 1)) + 1e-6  # unbiased, as torch.std
        std_t = math.sqrt(sum((x - mean_t) ** 2 for x in xt) / (m - 1)) + 1e-6
        total += sum(((x - mean_s) / std_s - (y - mean_t) / std_t) ** 2 for x, y in zip(xs, xt))
    return total / a.size / 2


def test_pkd_matches_loop_formula():
    s, t = _pair(2, 3, 4, 5)
    loss = pkd(s, t)
    assert loss.item() == pytest.approx(_pkd_loop(s.detach().numpy(), t.detach().numpy()), rel=1e-10)
    _assert_student_only(loss, s, t)


def test_pkd_is_one_minus_pearson_with_unbiased_factor():
    s, t = _pair(2, 3, 4, 5, seed=3)
    a, b = s.detach().numpy(), t.detach().numpy()
    m = a.shape[0] * a.shape[2] * a.shape[3]
    r = [np.corrcoef(a[:, j].ravel(), b[:, j].ravel())[0, 1] for j in range(a.shape[1])]
    expected = (m - 1) / m * (1 - np.mean(r))
    assert pkd(s, t).item() == pytest.approx(expected, rel=1e-5)  # eps 1e-6 on the std: ~1e-6 off


def test_pkd_ignores_scale_and_shift():
    _, t = _pair(2, 3, 4, 5)
    assert pkd(3.0 * t.detach() + 7.0, t).item() == pytest.approx(0.0, abs=1e-10)
    m = 2 * 4 * 5
    assert pkd(-t.detach(), t).item() == pytest.approx(2 * (m - 1) / m, rel=1e-5)  # r = −1; eps on the std


def test_pkd_resizes_student_bilinearly():
    s, t = _pair(2, 3, 8, 10)
    small = s.detach()[:, :, ::2, ::2]
    resized = F.interpolate(small, size=(8, 10), mode="bilinear", align_corners=False)
    expected = _pkd_loop(resized.numpy(), t.detach().numpy())
    assert pkd(small, t).item() == pytest.approx(expected, rel=1e-10)


# Ultralytics score-weighted L2


@pytest.mark.parametrize("weight_shape", ["flat", "map"])
def test_score_weighted_l2_matches_ultralytics(weight_shape):
    from ultralytics.nn.distill_model import DistillationModel

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    w = torch.rand(2, 1, 15, generator=g)
    reference = DistillationModel.loss_sl2(None, s, t, 0, (w,))  # self is unused: call it unbound
    weights = w if weight_shape == "flat" else w.view(2, 1, 3, 5)
    assert score_weighted_l2(s, t, weights).item() == pytest.approx(reference.item(), rel=1e-6)


def test_score_weighted_l2_loop_and_gradients():
    s, t = _pair(2, 3, 2, 2)
    w = torch.tensor([[[0.0, 1.0, 0.5, 0.25]], [[1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    a, b, wn = s.detach().numpy(), t.detach().numpy(), w.numpy()
    num = sum(
        wn[i, 0, k] * (a[i, j].ravel()[k] - b[i, j].ravel()[k]) ** 2
        for i in range(2)
        for j in range(3)
        for k in range(4)
    )
    loss = score_weighted_l2(s, t, w)
    assert loss.item() == pytest.approx(num / (wn.sum() * 3 + 1e-9), rel=1e-12)
    _assert_student_only(loss, s, t)


# MGD


def _identity_generator(mgd: MGDLoss) -> None:
    """conv3×3 centre taps = identity, so G(x) = x for x ≥ 0 (the ReLU in between keeps non-negatives)."""
    with torch.no_grad():
        for conv in (mgd.generation[0], mgd.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for k in range(conv.weight.shape[0]):
                conv.weight[k, k, 1, 1] = 1.0


def test_mgd_without_mask_is_scaled_squared_error():
    mgd = MGDLoss(2, 2, alpha=0.5, lambda_mask=0.0).double()
    _identity_generator(mgd)
    student = torch.tensor(
        [
            [
                [[1.0, 2.0], [3.0, 4.0]],
                [
                    [
                        0.5,
                        0.0,
                    ],
                    [1.0, 2.0],
                ],
            ]
        ],
        dtype=torch.float64,
    )
    teacher = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    # Σ (S − T)² = (0 + 1 + 4 + 9) + (0.25 + 0 + 1 + 4) = 19.25; N = 1
    assert mgd(student, teacher).item() == pytest.approx(0.5 * 19.25, rel=1e-12)


def test_mgd_mask_drops_lambda_of_positions_shared_over_channels():
    mgd = MGDLoss(3, 3, alpha=1.0, lambda_mask=0.65)
    _identity_generator(mgd)
    n, c, h, w = 4, 3, 64, 64
    student, teacher = torch.ones(n, c, h, w), torch.zeros(n, c, h, w)
    loss = mgd(student, teacher, generator=torch.Generator().manual_seed(0))
    kept = loss.item() * n / (c * h * w * n)  # α Σ mask·1 / N, the mask repeated over C channels
    assert kept == pytest.approx(0.35, abs=0.02)
    again = mgd(student, teacher, generator=torch.Generator().manual_seed(0))
    assert again.item() == loss.item()  # a seeded generator gives the same mask


def test_mgd_aligns_channels_and_trains_student_only():
    mgd = MGDLoss(2, 4).double()
    assert mgd.align is not None and mgd.align.out_channels == 4
    s = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    loss = mgd(s, t, generator=torch.Generator().manual_seed(1))
    _assert_student_only(loss, s, t)
    assert mgd.generation[0].weight.grad is not None
    assert MGDLoss(4, 4).align is None


# FGD masks


def test_fgd_masks_hand_box():
    # 64×64 image, 8×8 grid (stride 8); box x 8..24, y 16..40 → cells x 1..3, y 2..5 inclusive (official: ceil
    # end included) → 4 rows × 3 cols = 12 cells of 1/12; background 64 − 12 = 52 cells of 1/52
    boxes = [torch.tensor([[8.0, 16.0, 24.0, 40.0]])]
    fg, bg = fgd_masks(boxes, (64, 64), (8, 8))
    expected_fg = torch.zeros(8, 8)
    expected_fg[2:6, 1:4] = 1 / 12
    torch.testing.assert_close(fg[0], expected_fg)
    torch.testing.assert_close(bg[0], (expected_fg == 0).float() / 52)
    assert bg.sum().item() == pytest.approx(1.0)


def test_fgd_masks_overlap_keeps_max_and_empty_image():
    # non-square image and grid: 32 high × 64 wide, grid 4 × 8 (stride 8)
    boxes = [
        torch.tensor([[0.0, 0.0, 28.0, 20.0], [20.0, 4.0, 36.0, 12.0]]),  # big: y 0..3, x 0..4; small: y 0..2, x 2..5
        torch.zeros(0, 4),
    ]
    fg, bg = fgd_masks(boxes, (32, 64), (4, 8))
    big, small = 1 / (4 * 5), 1 / (3 * 4)
    expected = torch.zeros(4, 8)
    expected[0:4, 0:5] = big
    expected[0:3, 2:6] = small  # max(big, small) = small where they overlap
    torch.testing.assert_close(fg[0], expected)
    torch.testing.assert_close(bg[0], (expected == 0).float() / (expected == 0).sum())
    torch.testing.assert_close(fg[1], torch.zeros(4, 8))
    torch.testing.assert_close(bg[1], torch.full((4, 8), 1 / 32))


# FGD loss


def _gc_loop(x: np.ndarray, gc) -> np.ndarray:
    """GcBlock by hand: softmax-pooled context → conv → LayerNorm → ReLU → conv, added to every position."""
    w_mask = gc.conv_mask.weight.detach().numpy()[0, :, 0, 0]
    b_mask = gc.conv_mask.bias.detach().numpy()[0]
    conv1, norm, _, conv2 = gc.channel_add_conv
    w1, b1 = conv1.weight.detach().numpy()[:, :, 0, 0], conv1.bias.detach().numpy()
    gamma, beta = norm.weight.detach().numpy()[:, 0, 0], norm.bias.detach().numpy()[:, 0, 0]
    w2, b2 = conv2.weight.detach().numpy()[:, :, 0, 0], conv2.bias.detach().numpy()
    n, c, h, w = x.shape
    out = x.copy()
    for i in range(n):
        logits = np.array(
            [sum(w_mask[k] * x[i, k, y, z] for k in range(c)) + b_mask for y in range(h) for z in range(w)]
        )
        att = _softmax(logits)
        context = np.array([sum(att[y * w + z] * x[i, k, y, z] for y in range(h) for z in range(w)) for k in range(c)])
        hidden = w1 @ context + b1
        hidden = (hidden - hidden.mean()) / math.sqrt(hidden.var() + 1e-5) * gamma + beta
        add = w2 @ np.maximum(hidden, 0) + b2
        out[i] += add[:, None, None]
    return out


def _fgd_loop(a: np.ndarray, b: np.ndarray, fg: np.ndarray, bg: np.ndarray, module: FGDLoss) -> dict[str, float]:
    n, c, h, w = a.shape
    temp = module.temperature

    def attention(x):
        spatial = np.zeros((n, h, w))
        channel = np.zeros((n, c))
        for i in range(n):
            spatial[i] = h * w * _softmax(np.abs(x[i]).mean(0).ravel() / temp).reshape(h, w)
            channel[i] = c * _softmax(np.abs(x[i]).reshape(c, -1).mean(1) / temp)
        return spatial, channel

    sa_s, ca_s = attention(a)
    sa_t, ca_t = attention(b)
    fg_sum = bg_sum = 0.0
    for i in range(n):
        for k in range(c):
            for y in range(h):
                for z in range(w):
                    term = sa_t[i, y, z] * ca_t[i, k] * (a[i, k, y, z] - b[i, k, y, z]) ** 2
                    fg_sum += fg[i, y, z] * term
                    bg_sum += bg[i, y, z] * term
    att = np.abs(ca_s - ca_t).sum() / n + np.abs(sa_s - sa_t).sum() / n
    rel = ((_gc_loop(a, module.context_s) - _gc_loop(b, module.context_t)) ** 2).sum() / n
    return {
        "fg": module.alpha * fg_sum / n,
        "bg": module.beta * bg_sum / n,
        "attention": module.gamma * att,
        "global": module.lambda_ * rel,
    }


def test_fgd_matches_loop_formula():
    torch.manual_seed(0)
    module = FGDLoss(4, 4, alpha=1.0, beta=2.0, gamma=3.0, lambda_=4.0).double()
    with torch.no_grad():  # the GcBlocks start as identities (last conv 0): give them values to check
        for gc in (module.context_s, module.context_t):
            gc.channel_add_conv[-1].weight.normal_()
            gc.channel_add_conv[-1].bias.normal_()
            gc.channel_add_conv[1].weight.uniform_(0.5, 1.5)
    s, t = _pair(2, 4, 4, 6)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[20.0, 8.0, 44.0, 30.0], [1.0, 1.0, 5.0, 5.0]])]
    out = module(s, t, boxes, (32, 48))
    fg, bg = fgd_masks(boxes, (32, 48), (4, 6))
    expected = _fgd_loop(s.detach().numpy(), t.detach().numpy(), fg.double().numpy(), bg.double().numpy(), module)
    assert set(out) == {"fg", "bg", "attention", "global"}
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-9), key
    _assert_student_only(sum(out.values()), s, t)
    assert module.context_t.conv_mask.weight.grad is not None  # the teacher-side GcBlock is learned too


def test_fgd_global_term_starts_as_plain_squared_error_and_align():
    module = FGDLoss(3, 4)
    assert module.align is not None and module.align.in_channels == 3
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)
    out = module(s, t, [torch.zeros(0, 4), torch.zeros(0, 4)], (32, 32))
    aligned = module.align(s)
    assert out["global"].item() == pytest.approx(5e-6 * ((aligned - t) ** 2).sum().item() / 2, rel=1e-5)
    assert out["fg"].item() == 0.0
    same = FGDLoss(4, 4)(t, t, [torch.zeros(0, 4)] * 2, (32, 32))
    assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in same.values())
