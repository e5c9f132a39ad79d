"""Feature-imitation losses between a student and a teacher feature map of shape (N, C, H, W).

Unless said otherwise the student is already mapped to the teacher's shape by the caller's connector. Teacher
inputs are detached here, so gradients reach the student (and the loss's own parameters) only. Reduced-precision
inputs are promoted to fp32 before any sum over a whole map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detkd.losses._common import upcast
from detkd.losses.registry import register_feature_loss


def _check_same_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")


@register_feature_loss("fitnet")
def fitnet(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss: MSE, mean over all elements.

    Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015. The plain
    imitation baseline every other feature loss improves on.
    """
    _check_same_shape("fitnet", student, teacher)
    return F.mse_loss(upcast(student), upcast(teacher.detach()))


@register_feature_loss("cwd")
def cwd(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation: per (n, c), KL between the softmax over H·W of teacher and student.

    Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.
    L = τ²/(N·C) · Σ_{n,c} KL(φ(T_nc/τ) ‖ φ(S_nc/τ)), as mmrazor's ``ChannelWiseDivergence``: each channel is
    treated as a distribution over positions, so the student learns where each channel fires, not its scale.
    Exactly 0 when S == T (the KL is computed from two log-softmaxes).
    """
    _check_same_shape("cwd", student, teacher)
    n, c = student.shape[:2]
    log_p_s = F.log_softmax(upcast(student).flatten(2) / tau, dim=-1)
    log_p_t = F.log_softmax(upcast(teacher.detach()).flatten(2) / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)  # Σ p_t (log p_t − log p_s)
    return kl * tau**2 / (n * c)


def _standardise_channels(x: torch.Tensor) -> torch.Tensor:
    """(C, N·H·W): each channel to zero mean, unit unbiased std over (N, H, W), eps 1e-6 added to the std."""
    flat = x.transpose(0, 1).flatten(1)
    return (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)


@register_feature_loss("pkd", connector_at_equal_channels=False)
def pkd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """PKD: MSE between per-channel standardised maps, halved; equals 1 − Pearson r up to (M−1)/M.

    Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient",
    NeurIPS 2022. Standardising each channel over (N, H, W) removes the magnitude gap between heterogeneous
    detectors (e.g. a two-stage teacher and a one-stage student), so only the relational pattern is imitated.
    Follows mmrazor's ``PKDLoss``: ``torch.std`` (unbiased), so with M = N·H·W the value is
    (M−1)/M · (1 − mean_c r_c). A student of another H, W is first resized bilinearly to the teacher's.
    """
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear")
    _check_same_shape("pkd", student, teacher)
    norm_s = _standardise_channels(upcast(student))
    norm_t = _standardise_channels(upcast(teacher.detach()))
    return F.mse_loss(norm_s, norm_t) / 2


@register_feature_loss("sl2")
def score_weighted_l2(student: torch.Tensor, teacher: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Ultralytics' built-in distillation loss: squared error weighted by the teacher's confidence per location.

    Ultralytics 8.4, ``ultralytics/nn/distill_model.py::DistillationModel.loss_sl2``. ``teacher_scores``
    (N, 1, H·W) or (N, 1, H, W) is the teacher's max class probability per location (taken as a constant);
    L = Σ w·(S−T)² / (Σ w · C + 1e-9), so confident (object) locations dominate and the value is a per-channel mean.
    """
    _check_same_shape("score_weighted_l2", student, teacher)
    n, c = student.shape[:2]
    w = upcast(teacher_scores.detach()).reshape(n, 1, -1)
    if w.shape[-1] != student[0, 0].numel():
        shape = tuple(teacher_scores.shape)
        raise ValueError(f"score_weighted_l2: teacher_scores {shape} do not match features {tuple(student.shape)}")
    sq = (upcast(student).reshape(n, c, -1) - upcast(teacher.detach()).reshape(n, c, -1)).pow(2)
    return (sq * w).sum() / (w.sum() * c + 1e-9)


@register_feature_loss("mgd")
class MGDLoss(nn.Module):
    """Masked generative distillation: regenerate the teacher map from a randomly masked student map.

    Yang et al., "Masked Generative Distillation", ECCV 2022. Follows the official repo
    (yzd-v/MGD, ``det/mmdet/distillation/losses/mgd.py``): 1×1 align conv when channels differ; a mask per
    image and position (shared by all channels) drops each position with probability ``lambda_mask`` (value 0);
    generator conv3×3 → ReLU → conv3×3 at teacher width; L = α · Σ_{C,H,W,N} (G(mask·S) − T)² / N. Masking forces
    the student to carry enough context to rebuild the teacher's features, not just to copy them.
    """

    def __init__(self, student_channels: int, teacher_channels: int, alpha: float = 2e-5, lambda_mask: float = 0.65):
        super().__init__()
        self.alpha = alpha
        self.lambda_mask = lambda_mask
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The weighted MGD loss; ``generator`` makes the random mask reproducible (it may live on the CPU)."""
        if self.align is not None:
            student = self.align(student)
        _check_same_shape("MGDLoss", student, teacher)
        n, _, h, w = student.shape
        device = generator.device if generator is not None else student.device
        draw = torch.rand((n, 1, h, w), generator=generator, device=device)
        keep = (draw <= 1 - self.lambda_mask).to(student.device, student.dtype)  # official: rand > 1 − λ → 0
        generated = upcast(self.generation(student * keep))
        return self.alpha * (generated - upcast(teacher.detach())).pow(2).sum() / n


def fgd_masks(
    gt_boxes: Sequence[torch.Tensor],
    image_size: tuple[float, float],
    feature_size: tuple[int, int],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FGD's foreground and background masks, each (N, H, W), from xyxy boxes in input-image pixels.

    Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022; cells as in the official
    repo (yzd-v/FGD, ``mmdet/distillation/losses/fgd.py``, current version with rows = y): a box scaled to the
    grid covers rows floor(y1)..ceil(y2) and columns floor(x1)..ceil(x2), both ends included (so a box whose
    edges fall on cell borders also takes the next row and column) and clipped to the grid. Each covered cell
    gets 1/(h·w) with h = ceil(y2) − floor(y1) + 1, w likewise (unclipped counts); overlapping boxes keep the
    max, so small objects weigh as much as large ones. Background cells (no box) get 1/#background cells.
    """
    grid_h, grid_w = feature_size
    img_h, img_w = image_size
    rows = torch.arange(grid_h, device=device).view(1, -1, 1)
    cols = torch.arange(grid_w, device=device).view(1, 1, -1)
    fg = []
    for boxes in gt_boxes:
        boxes = boxes.detach().to(device, torch.float32).reshape(-1, 4)
        if not len(boxes):
            fg.append(torch.zeros(grid_h, grid_w, device=device))
            continue
        x0 = torch.floor(boxes[:, 0] / img_w * grid_w).view(-1, 1, 1)
        x1 = torch.ceil(boxes[:, 2] / img_w * grid_w).view(-1, 1, 1)
        y0 = torch.floor(boxes[:, 1] / img_h * grid_h).view(-1, 1, 1)
        y1 = torch.ceil(boxes[:, 3] / img_h * grid_h).view(-1, 1, 1)
        inside = (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)
        value = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1))
        fg.append((inside * value).amax(0))
    mask_fg = torch.stack(fg)
    mask_bg = (mask_fg == 0).float()
    mask_bg = mask_bg / mask_bg.sum((1, 2), keepdim=True).clamp_min(1)  # all-foreground image: background 0
    return mask_fg, mask_bg


def _fgd_attention(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FGD attention: spatial H·W·φ(mean_c|x|/t) (N, H, W) and channel C·φ(mean_HW|x|/t) (N, C)."""
    n, c, h, w = x.shape
    magnitude = x.abs()
    spatial = h * w * F.softmax(magnitude.mean(1).reshape(n, -1) / temperature, dim=1).reshape(n, h, w)
    channel = c * F.softmax(magnitude.mean((2, 3)) / temperature, dim=1)
    return spatial, channel


class GlobalContext(nn.Module):
    """GcBlock as FGD uses it: x + transform(attention-pooled context of x).

    Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW 2019.
    Context = Σ_hw softmax_hw(conv1×1(x))·x; transform = conv1×1 (C → C/2) → LayerNorm → ReLU → conv1×1 (→ C).
    Initialised as the FGD repo does (kaiming fan-in for the pooling conv, zeros for the last conv), so it starts
    as the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"GlobalContext needs at least 2 channels, got {channels}")
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, 1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add_conv[-1].weight)
        nn.init.zeros_(self.channel_add_conv[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        attention = F.softmax(self.conv_mask(x).reshape(n, 1, -1), dim=-1)  # (N, 1, HW)
        context = torch.bmm(x.reshape(n, c, -1), attention.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.channel_add_conv(context)


@register_feature_loss("fgd")
class FGDLoss(nn.Module):
    """Focal and global distillation: attention-weighted imitation split by GT boxes, plus global relations.

    Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022.
    Reductions follow the official repo (yzd-v/FGD, ``mmdet/distillation/losses/fgd.py``); N = batch size:

    - fg = α · Σ M_fg · A_S^T · A_C^T · (S − T)² / N and bg = β · (same with M_bg): the focal term, weighted by
      the TEACHER's spatial and channel attention only (the official ``get_fea_loss`` ignores the student's).
    - attention = γ · (Σ|A_C^S − A_C^T| / N + Σ|A_S^S − A_S^T| / N): L1 summed over C and H·W, divided by N.
    - global = λ · Σ (GC_s(S) − GC_t(T))² / N, with one GcBlock for the student and one for the teacher features.

    S is the student after the 1×1 align conv (created when channels differ). The terms come back separately, each
    already weighted, so that a trainer can log them; their sum is the official loss.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 1e-3,
        lambda_: float = 5e-6,
    ):
        super().__init__()
        self.temperature = temperature
        self.alpha, self.beta, self.gamma, self.lambda_ = alpha, beta, gamma, lambda_
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.context_s = GlobalContext(teacher_channels)
        self.context_t = GlobalContext(teacher_channels)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        gt_boxes: Sequence[torch.Tensor],
        image_size: tuple[float, float],
    ) -> dict[str, torch.Tensor]:
        """``{"fg", "bg", "attention", "global"}``, weighted; ``gt_boxes`` per image (K, 4) xyxy in pixels of an
        input image of ``image_size`` (H_img, W_img)."""
        if self.align is not None:
            student = self.align(student)
        _check_same_shape("FGDLoss", student, teacher)
        if len(gt_boxes) != student.shape[0]:
            raise ValueError(f"FGDLoss: {len(gt_boxes)} box sets for a batch of {student.shape[0]}")
        s, t = upcast(student), upcast(teacher.detach())
        n, _, h, w = t.shape
        spatial_t, channel_t = _fgd_attention(t, self.temperature)
        spatial_s, channel_s = _fgd_attention(s, self.temperature)
        mask_fg, mask_bg = fgd_masks(gt_boxes, image_size, (h, w), device=t.device)

        focal = (s - t).pow(2) * spatial_t[:, None] * channel_t[:, :, None, None]
        attention = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
        relation = (self.context_s(s) - self.context_t(t)).pow(2).sum() / n
        return {
            "fg": self.alpha * (focal * mask_fg[:, None]).sum() / n,
            "bg": self.beta * (focal * mask_bg[:, None]).sum() / n,
            "attention": self.gamma * attention,
            "global": self.lambda_ * relation,
        }
