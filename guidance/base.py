"""The representation-guidance interface: align the student's block-k tokens, through a trained head,
to a target.

What differs between methods is where the target comes from and how it is compared: SRA (sra/)
takes it from the EMA teacher at a lower noise level and a deeper block; REPA (repa/) from a frozen
image encoder on the clean image. A method is one module: a config dataclass (its flags), a head, a
`target`, a distance. The training loss (guidance/loss.py) is written once against this interface.
"""
import abc
import dataclasses
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from configs.fields import check_range, option
from errors import UserError

from .distances import DISTANCES, SMOOTH_L1_BETA, check_same_tokens, token_distance

WEIGHT_SCHEDULES = ("constant", "release")
# The SRA release's λ schedule (SiT smooth-L1, 256 px): λ·0.1^((epoch − 149)/1000) after epoch 149
# (SPEC §3 step 7); at 512 px it starts at epoch 99 and spans 800 epochs (the 512 presets set that).
RELEASE_DECAY_START_EPOCH = 149
RELEASE_DECAY_EPOCHS = 1000
RELEASE_DECAY_BASE = 0.1


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """The settings every guidance method shares. Each method subclasses it with its own fields and its
    own defaults for λ and the distance; `method` names it (`--guidance`)."""

    method: ClassVar[str]

    student_depth: int | None = option(
        None, "k_s: align the output of this many student blocks (default: per model, see the presets)",
        type=int, minimum=1)
    align_weight: float = option(0.0, "λ, the weight of the alignment loss", minimum=0.0)
    align_weight_schedule: str = option(
        "constant", "λ constant, or the SRA release's per-epoch decay from --align-weight (the release's DiT "
        "runs start at 0.04)", choices=WEIGHT_SCHEDULES)
    align_decay_start_epoch: int = option(
        RELEASE_DECAY_START_EPOCH, "release schedule: the last epoch at full λ", minimum=0)
    align_decay_epochs: int = option(
        RELEASE_DECAY_EPOCHS, "release schedule: epochs over which λ falls tenfold", minimum=1)
    align_distance: str = option("cosine", "per-token distance over the feature dimension", choices=DISTANCES)
    smooth_l1_beta: float = option(SMOOTH_L1_BETA, "β of the smooth-L1 distance", minimum=0.0,
                                   exclusive_minimum=True)

    def __post_init__(self):
        problem = check_range(self)
        if problem:
            raise UserError(problem)

    def resolved_for(self, model_name: str, depth: int) -> "AlignmentConfig":
        """This config with the per-model defaults filled in and the block indices checked against a
        model of `depth` blocks. Methods with more per-model settings extend it."""
        student_depth = self.student_depth or self.default_student_depth(model_name)
        if not 1 <= student_depth <= depth:
            raise UserError(f"--student-depth {student_depth} is outside {model_name}'s blocks 1..{depth}")
        return dataclasses.replace(self, student_depth=student_depth)

    @classmethod
    def default_student_depth(cls, model_name: str) -> int:
        raise NotImplementedError

    def unused_fields(self) -> dict[str, str]:
        """Fields this config's other values make irrelevant, each with the setting it needs (a flag given
        for one of them is refused)."""
        return {}

    def with_run_length(self, max_steps: int) -> "AlignmentConfig":
        """This config with settings that default to the run's length filled in."""
        return self

    def with_token_groups(self, enabled: bool) -> "AlignmentConfig":
        """This config with settings that default to whether the run trains with token groups filled in."""
        return self

    @property
    def own_teacher(self) -> bool:
        """Whether the method keeps a teacher of its own besides the sampled EMA (teacher_momentum then
        gives its update)."""
        return False

    def teacher_momentum(self, k: int) -> float:
        raise NotImplementedError

    def weight(self, step: int, steps_per_epoch: int) -> float:
        """λ at optimizer step `step` (0-based): constant, or the release's per-epoch decay."""
        return align_weight(step, self.align_weight_schedule, self.align_weight, steps_per_epoch,
                            self.align_decay_start_epoch, self.align_decay_epochs)


def align_weight(step, schedule="constant", base=0.2, steps_per_epoch=None,
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


@dataclasses.dataclass(frozen=True)
class AlignmentInputs:
    """What a training step knows when a method computes its target; tensors on the step's device."""

    x0: Tensor  # (N, C, H, W) the clean model input
    eps: Tensor  # (N, C, H, W) the noise in the student's x_t
    t: Tensor  # (N,) the student's time, in the objective's units; (N, G) one per group with token groups
    y: Tensor  # (N,) labels or (N, L, D) text contexts: the condition the student saw (after CFG dropout)
    images: Tensor | None  # (N, 3, R, R) uint8 clean images; only for methods with needs_images
    groups: object = None  # dts.DrawnGroups: the student's token groups and their times (dual-time), or None
    clean_y: Tensor | None = None  # the conditions before CFG dropout (None: the same as y)


@dataclasses.dataclass
class GuidanceContext:
    """The parts of a run a method may build on."""

    objective: object  # objectives.Objective
    teacher: nn.Module  # the teacher backbone (the sampled EMA, or the method's own): eval mode, no gradients
    backbone: nn.Module  # the student backbone (width, token grid)
    device: torch.device


class Guidance(abc.ABC):
    """One representation-guidance method of a run, built from its config and the run's context."""

    name: ClassVar[str]
    config_class: ClassVar[type[AlignmentConfig]]
    needs_images: ClassVar[bool] = False  # the dataset must carry the clean images (preprocessing --keep-images)

    def __init__(self, config: AlignmentConfig, context: GuidanceContext):
        if config.student_depth is None:
            raise ValueError("resolve the config for the model first (AlignmentConfig.resolved_for)")
        self.config = config
        self.linear_init = context.backbone.linear_init  # how build_head initializes (models.init_linears)

    @property
    def student_depth(self) -> int:
        return self.config.student_depth

    @abc.abstractmethod
    def build_head(self, hidden_size: int) -> nn.Module | None:
        """The trained head from the student's width to the target's: (N, T, D) -> (N, T, D_target); None
        compares the student's tokens with the target directly."""

    @abc.abstractmethod
    def target(self, inputs: AlignmentInputs) -> Tensor:
        """Target tokens (N, T, D_target), without gradients."""

    def distance(self, projected: Tensor, target: Tensor) -> Tensor:
        """Per-token distance (N, T)."""
        check_same_tokens(projected, target)
        return token_distance(projected, target, self.config.align_distance, self.config.smooth_l1_beta)

    def identity(self) -> dict:
        """What, beyond the config, makes the target: recorded with the run by content (a frozen
        encoder's weights), so a resumed run can refuse a different one. Empty for SRA."""
        return {}
