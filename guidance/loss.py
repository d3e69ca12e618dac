"""The training loss, written once for every objective and every guidance method (SPEC §3 step 7).

Per step, for clean inputs x0 and conditions y (class labels or text contexts, conditioning/): y is
dropped to its null for CFG once; the student sees x_t at
time t and yields its prediction and (with guidance) its projected block-k_s tokens in one pass; the
method computes its target without gradients; L = L_gen + λ·mean over tokens of the distance.
With token groups (dts/), t is one time per group and every token is noised, conditioned and
regressed at its own group's time.
"""
import torch
import torch.nn as nn

from conditioning import as_condition

from .base import AlignmentInputs


class Student(nn.Module):
    """The trained parameters: the backbone and, with guidance, the head on its block-k tokens.

    One module so that data-parallel wrappers see a single forward; it returns the prediction and the
    block-`feature_depth` tokens through the head (the tokens themselves without a head; None without
    a feature depth)."""

    def __init__(self, backbone, head=None, feature_depth=None):
        super().__init__()
        if head is not None and feature_depth is None:
            raise ValueError("a projection head needs a feature depth")
        self.backbone = backbone
        self.head = head
        self.feature_depth = feature_depth

    def forward(self, x_t, t, y, groups=None):
        if self.feature_depth is None:
            return self.backbone(x_t, t, y, groups), None
        prediction, tokens = self.backbone.forward_with_features(x_t, t, y, self.feature_depth, groups)
        return prediction, tokens if self.head is None else self.head(tokens)  # (N, C, H, W), (N, T, D_target)


class TrainingLoss:
    """L = L_gen + λ·L_align; with `guidance=None`, the plain DiT/SiT loss, drawing the same random
    numbers for everything the two share."""

    def __init__(self, objective, dropout_prob, condition, guidance=None, grouping=None):
        """dropout_prob: the share of samples trained on the null condition (CFG); condition: a
        conditioning.Condition (or, for class labels, the null class index); grouping: a dts.TokenGrouping
        for dual-time scheduling / attention separation, or None."""
        self.objective = objective
        self.dropout_prob = dropout_prob
        self.condition = as_condition(condition)
        self.guidance = guidance
        self.grouping = grouping

    def __call__(self, student, x0, y, weight, images=None):
        """student: a `Student` (possibly wrapped for data parallelism); y: the batch's conditions (N,) or
        (N, L, D); images: the clean uint8 images,
        for methods that need them. Returns 0-d tensors: loss, gen, align (align is 0 without guidance)."""
        objective = self.objective
        clean_y, y = y, self.condition.drop(y, self.dropout_prob)
        drawn = groups = None
        if self.grouping is None:
            t = where = objective.sample_time(x0.shape[0], x0.device)  # (N,)
        else:
            drawn = self.grouping.draw(x0.shape[0], x0.device)
            t, where, groups = drawn.times, drawn.time_map(), drawn.groups  # (N, G), (N, 1, H, W)
        eps = torch.randn_like(x0)
        x_t = objective.noisy(x0, eps, where)
        prediction, projected = student(x_t, objective.model_time(t), y, groups)
        gen = objective.loss(prediction, x0, eps, where, x_t).mean()
        if self.guidance is None:
            return {"loss": gen, "gen": gen.detach(), "align": torch.zeros_like(gen)}
        with torch.no_grad():
            target = self.guidance.target(AlignmentInputs(x0, eps, t, y, images, drawn, clean_y))
        align = self.guidance.distance(projected, target).mean()
        return {"loss": gen + weight * align, "gen": gen.detach(), "align": align.detach()}
