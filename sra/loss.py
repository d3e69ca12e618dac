"""The SRA training loss, written once for every objective (SPEC §3).

Per step, for clean inputs x0 and labels y: labels are dropped for CFG once and shared by student and
teacher; the student sees x_t at time t and yields its prediction and its block-k_s tokens in one pass;
the EMA teacher sees the same x0 and ε at the lower noise level t_T = shift_time(t, Δ) and runs only
its first k_T blocks, without gradients; the projected student tokens are aligned to the teacher's.
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import drop_labels

DISTANCES = ("smooth_l1", "cosine", "l2", "l1")
SMOOTH_L1_BETA = 0.05  # paper Appendix C
ALIGN_WEIGHT = 0.2  # λ, paper §3 (constant)
# The release's λ schedule for SiT smooth-L1 at 256 px: λ·0.1^((epoch − 149)/1000) after epoch 149.
RELEASE_DECAY_START_EPOCH = 149
RELEASE_DECAY_EPOCHS = 1000
RELEASE_DECAY_BASE = 0.1
WEIGHT_SCHEDULES = ("constant", "release")


@dataclasses.dataclass(frozen=True)
class SRAConfig:
    student_depth: int  # k_s, 1-based
    teacher_depth: int  # k_T, 1-based
    t_max: float  # Δ ~ U(0, t_max) (dynamic) or Δ = t_max (fixed), as a fraction of the time range
    fixed_interval: bool = False
    distance: str = "smooth_l1"
    smooth_l1_beta: float = SMOOTH_L1_BETA

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"alignment distance must be one of {DISTANCES}, got {self.distance!r}")
        if not 0.0 <= self.t_max <= 1.0:
            raise ValueError(f"t_max must be in [0, 1], got {self.t_max}")


def token_distance(pred, target, distance, smooth_l1_beta=SMOOTH_L1_BETA):
    """Distance over the feature dimension for every token: (N, T, D), (N, T, D) -> (N, T).

    Computed in fp32 whatever the autocast dtype. Element-wise distances are averaged over D, so their
    scale does not depend on the width; cosine is 1 − cos over D (not over tokens, as the release has)."""
    pred, target = pred.float(), target.float()
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=smooth_l1_beta, reduction="none").mean(dim=-1)
    if distance == "l2":
        return (pred - target).pow(2).mean(dim=-1)
    if distance == "l1":
        return (pred - target).abs().mean(dim=-1)
    raise ValueError(f"alignment distance must be one of {DISTANCES}, got {distance!r}")


def align_weight(step, schedule="constant", base=ALIGN_WEIGHT, steps_per_epoch=None,
                 decay_start_epoch=RELEASE_DECAY_START_EPOCH, decay_epochs=RELEASE_DECAY_EPOCHS):
    """λ at a given optimizer step: constant (paper) or the release's per-epoch exponential decay."""
    if schedule == "constant":
        return base
    if schedule != "release":
        raise ValueError(f"weight schedule must be one of {WEIGHT_SCHEDULES}, got {schedule!r}")
    epoch = step // steps_per_epoch
    if epoch <= decay_start_epoch:
        return base
    return base * RELEASE_DECAY_BASE ** ((epoch - decay_start_epoch) / decay_epochs)


class Student(nn.Module):
    """The trained parameters: the backbone and, with SRA, the projection head.

    One module so that data-parallel wrappers see a single forward; it returns the prediction and the
    projected block-k_s tokens (None without SRA)."""

    def __init__(self, backbone, head=None, feature_depth=None):
        super().__init__()
        if (head is None) != (feature_depth is None):
            raise ValueError("a projection head needs a feature depth, and the other way round")
        self.backbone = backbone
        self.head = head
        self.feature_depth = feature_depth

    def forward(self, x_t, t, y):
        if self.head is None:
            return self.backbone(x_t, t, y), None
        prediction, tokens = self.backbone.forward_with_features(x_t, t, y, self.feature_depth)
        return prediction, self.head(tokens)  # (N, C, H, W), (N, T, D)


class TrainingLoss:
    """L = L_gen + λ·L_align (SPEC §3 step 7); with `sra=None`, the plain DiT/SiT loss, drawing the
    same random numbers for everything the two share."""

    def __init__(self, objective, class_dropout_prob, null_class, sra=None):
        self.objective = objective
        self.class_dropout_prob = class_dropout_prob
        self.null_class = null_class
        self.sra = sra

    def __call__(self, student, teacher, x0, y, weight):
        """student: a `Student` (possibly wrapped for data parallelism); teacher: the EMA backbone.
        Returns a dict of 0-d tensors: loss, gen, align (align is 0 without SRA)."""
        objective, n = self.objective, x0.shape[0]
        y = drop_labels(y, self.class_dropout_prob, self.null_class)
        t = objective.sample_time(n, x0.device)
        eps = torch.randn_like(x0)
        x_t = objective.noisy(x0, eps, t)
        prediction, projected = student(x_t, objective.model_time(t), y)
        gen = objective.loss(prediction, x0, eps, t, x_t).mean()
        if self.sra is None:
            return {"loss": gen, "gen": gen.detach(), "align": torch.zeros_like(gen)}
        target = self.teacher_features(teacher, x0, eps, t, y)
        align = token_distance(projected, target, self.sra.distance, self.sra.smooth_l1_beta).mean()
        return {"loss": gen + weight * align, "gen": gen.detach(), "align": align.detach()}

    @torch.no_grad()
    def teacher_features(self, teacher, x0, eps, t, y):
        """Teacher tokens after block k_T at t_T = shift_time(t, Δ), from the same x0 and ε and the
        student's dropped labels; only the first k_T blocks run (SPEC §3 steps 1–4)."""
        sra, objective = self.sra, self.objective
        delta = objective.sample_delta(x0.shape[0], sra.t_max, sra.fixed_interval, x0.device)
        t_teacher = objective.shift_time(t, delta)
        x_teacher = objective.noisy(x0, eps, t_teacher)
        return teacher.forward_features(x_teacher, objective.model_time(t_teacher), y, sra.teacher_depth)
