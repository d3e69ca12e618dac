"""SRA as a guidance method (SPEC §3): the target is the EMA teacher's block-k_T tokens at a lower noise
level, from the same x0 and ε and the student's dropped labels; only the first k_T blocks run."""
import contextlib
import dataclasses
import math

import torch

from configs.fields import option
from diffusion.ddpm import NUM_TIMESTEPS, DDPMObjective
from errors import UserError
from guidance.base import AlignmentConfig, AlignmentInputs, Guidance, GuidanceContext
from guidance.distances import DISTANCES
from models import family_of
from models.fp8 import fp8_linears, fp8_unsupported, token_linears

from .defaults import T_MAX, default_block_pair
from .head import ProjectionHead
from .interval import INTERVALS, check_interval, draw_delta

ALIGN_WEIGHT = 0.2  # λ, paper §3 (constant)
RELEASE_DIT_TEACHER_MIN_STEP = 1  # the DiT release clamps t − Δ at step 1 (SPEC §3 step 1)
# The teacher's time with token groups (dts/; the release's `--teacher-t`, SiT-SRA_DTS_AS/loss.py):
# sra: each group's own t − Δ; self_flow: the smallest group time for the whole image; same: the student's.
TEACHER_TIMES = ("sra", "self_flow", "same")
# How the teacher follows the student (paper Appendix F): `ema`, the EMA that is also sampled, m = --ema-decay
# (0.9999, the paper's choice); `ssl_cosine`, a separate teacher whose m rises from m0 to 1 over the run as in
# DINO/iBOT, m_k = 1 − (1 − m0)·(cos(πk/K) + 1)/2 (DINO's `cosine_scheduler(momentum_teacher, 1, …)`, m0 = 0.996);
# `copy`, a separate teacher equal to the student after every step (m = 0).
TEACHER_UPDATES = ("ema", "ssl_cosine", "copy")
SSL_MOMENTUM_START = 0.996  # DINO's default --momentum_teacher; the paper's "0.996 → 1"
# The teacher forward's precision: the training step's autocast (`step`, as the paper and release), bf16 or
# fp16 autocast whatever the step's, or fp8: bf16 autocast with the blocks' token-wise linear layers in FP8
# e4m3 with row-wise scales (models/fp8.py; Hopper GPUs).
TEACHER_PRECISIONS = ("step", "bf16", "fp16", "fp8")
# The condition the teacher sees: the student's after CFG dropout (SPEC §3 step 4; the release's SiT-SRA and
# DiT-SRA pass the dropped labels), or the one before it (the release's SiT-SRA_DTS_AS, whose student drops
# labels inside its own forward, which its eval-mode teacher does not run). Default: by token groups.
TEACHER_LABELS = ("dropped", "clean")


@dataclasses.dataclass(frozen=True)
class SRAConfig(AlignmentConfig):
    """`--guidance sra`: SPEC §3, with the paper's defaults."""

    method = "sra"

    align_weight: float = option(ALIGN_WEIGHT, "λ, the weight of the alignment loss (SRA paper §3: 0.2)",
                                 minimum=0.0)
    align_distance: str = option("smooth_l1", "per-token distance over the feature dimension (SRA paper: "
                                 "smooth_l1; the release's newer scripts: cosine)", choices=DISTANCES)
    teacher_depth: int | None = option(
        None, "k_T: the target is the output of this many EMA-teacher blocks (default: per model)",
        type=int, minimum=1)
    t_max: float = option(T_MAX, "the teacher's interval Δ as a fraction of the time range", minimum=0.0,
                          maximum=1.0)
    interval: str = option("dynamic", "Δ ~ U(0, t_max) per sample, or Δ = t_max", choices=INTERVALS)
    dit_teacher_min_step: int = option(
        0, "DiT: the teacher step floor, 0 as the paper or 1 as the release", choices=(0, 1), objective="ddpm")
    projection_head: bool = option(
        True, "align the head's projection of the student's tokens (off: the tokens themselves; Table 3.2, PH.)")
    teacher_update: str = option(
        "ema", "the teacher: the sampled EMA (ema, m = --ema-decay), a separate EMA with DINO's cosine "
        "schedule (ssl_cosine), or the student itself after every step (copy); paper Appendix F",
        choices=TEACHER_UPDATES)
    teacher_momentum_start: float = option(
        SSL_MOMENTUM_START, "ssl_cosine: m at step 0, rising to 1 at --teacher-momentum-steps",
        minimum=0.0, maximum=1.0)
    teacher_momentum_steps: int | None = option(
        None, "ssl_cosine: K, the steps over which m reaches 1 (default: --max-steps, recorded with the run)",
        type=int, minimum=1)
    teacher_t: str = option(
        "sra", "with token groups: the teacher's time per group t − Δ (sra), the smallest group time for the "
        "whole image (self_flow), or the student's times (same)", choices=TEACHER_TIMES, families=("SiT",))
    teacher_mask: bool = option(
        True, "with token groups: the teacher sees the student's groups (and their attention separation); "
        "--teacher-t sra and same need it", families=("SiT",))
    teacher_labels: str | None = option(
        None, "the condition the teacher sees: the student's after CFG dropout (dropped, SPEC §3) or the one "
        "before it (clean, the release's dual-time variant); default: clean with token groups, else dropped",
        choices=TEACHER_LABELS, type=str)
    teacher_precision: str = option(
        "step", "the teacher forward's precision: the training step's (--mixed-precision), bf16, fp16, or fp8 "
        "(the blocks' token-wise matmuls in FP8 with row-wise scales; Hopper GPUs)", choices=TEACHER_PRECISIONS)

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_t != "self_flow" and not self.teacher_mask:
            raise UserError(f"--teacher-t {self.teacher_t} gives each group its own teacher time, which needs "
                            "--teacher-mask on (only --teacher-t self_flow runs the teacher on the whole image)")

    @classmethod
    def default_student_depth(cls, model_name):
        return default_block_pair(model_name)[0]

    def unused_fields(self):
        if self.teacher_update == "ssl_cosine":
            return {}
        return {name: "--teacher-update ssl_cosine" for name in ("teacher_momentum_start", "teacher_momentum_steps")}

    def with_run_length(self, max_steps):
        if self.teacher_update == "ssl_cosine" and self.teacher_momentum_steps is None:
            return dataclasses.replace(self, teacher_momentum_steps=max_steps)
        return self

    def with_token_groups(self, enabled):
        if self.teacher_labels is None:
            return dataclasses.replace(self, teacher_labels="clean" if enabled else "dropped")
        return self

    @property
    def own_teacher(self) -> bool:
        return self.teacher_update != "ema"

    def teacher_momentum(self, k: int) -> float:
        """m of the teacher update after optimizer step k (0-based) for a teacher of its own."""
        if self.teacher_update == "copy":
            return 0.0
        if self.teacher_update == "ssl_cosine":
            progress = min(k, self.teacher_momentum_steps) / self.teacher_momentum_steps
            return 1.0 - (1.0 - self.teacher_momentum_start) * (math.cos(math.pi * progress) + 1.0) / 2.0
        raise ValueError("--teacher-update ema uses the sampled EMA as the teacher; it has no momentum of its own")

    def resolved_for(self, model_name, depth):
        resolved = super().resolved_for(model_name, depth)
        teacher_depth = self.teacher_depth or default_block_pair(model_name)[1]
        if not 1 <= teacher_depth <= depth:
            raise UserError(f"--teacher-depth {teacher_depth} is outside {model_name}'s blocks 1..{depth}")
        if teacher_depth < resolved.student_depth:
            raise UserError(
                f"--teacher-depth {teacher_depth} is shallower than --student-depth {resolved.student_depth}: "
                "SRA aligns early student blocks to a deeper teacher block (SPEC §3)")
        if family_of(model_name).objective == DDPMObjective.name:
            check_interval(self.t_max, self.interval, NUM_TIMESTEPS)
        return dataclasses.replace(resolved, teacher_depth=teacher_depth)


class SRA(Guidance):
    name = "sra"
    config_class = SRAConfig

    def __init__(self, config: SRAConfig, context: GuidanceContext):
        super().__init__(config, context)
        self.objective = context.objective
        self.teacher = context.teacher
        check_interval(config.t_max, config.interval, self.objective.discrete_steps)
        self.device_type = torch.device(context.device).type
        self.fp8_layers = []
        if config.teacher_precision == "fp8":
            problem = fp8_unsupported(context.device)
            if problem:
                raise UserError(f"--teacher-precision fp8: {problem}; use bf16 or step")
            self.fp8_layers = token_linears(context.teacher)

    def teacher_precision(self):
        """The context of the teacher's forward: autocast to --teacher-precision, FP8 layers for fp8."""
        precision = self.config.teacher_precision
        if precision == "step":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        stack.enter_context(torch.autocast(self.device_type, dtype=dtype))
        if precision == "fp8":
            stack.enter_context(fp8_linears(self.fp8_layers))
        return stack

    def build_head(self, hidden_size):
        return ProjectionHead(hidden_size, self.linear_init) if self.config.projection_head else None

    def teacher_time(self, t, n, device):
        """t_T = shift_time(t, Δ) for a fresh Δ (SPEC §3 step 1), with the DiT release's floor if asked."""
        config = self.config
        delta = draw_delta(self.objective, n, config.t_max, config.interval == "fixed", device)
        t_teacher = self.objective.shift_time(t, delta)
        if config.dit_teacher_min_step:
            t_teacher = t_teacher.clamp(min=config.dit_teacher_min_step)
        return t_teacher

    def target(self, inputs: AlignmentInputs):
        """Teacher tokens after block k_T at t_T from the same x0 and ε (SPEC §3 steps 1–4)."""
        if inputs.groups is not None:
            return self.grouped_target(inputs)
        x0, objective = inputs.x0, self.objective
        t_teacher = self.teacher_time(inputs.t, x0.shape[0], x0.device)
        x_teacher = objective.noisy(x0, inputs.eps, t_teacher)
        with self.teacher_precision():
            return self.teacher.forward_features(x_teacher, objective.model_time(t_teacher),
                                                 self.teacher_condition(inputs), self.config.teacher_depth)

    def teacher_condition(self, inputs: AlignmentInputs):
        """The labels or contexts the teacher is conditioned on (--teacher-labels; unresolved, by groups)."""
        labels = self.config.teacher_labels or ("clean" if inputs.groups is not None else "dropped")
        return inputs.clean_y if labels == "clean" and inputs.clean_y is not None else inputs.y

    def grouped_target(self, inputs: AlignmentInputs):
        """The teacher for a student trained with token groups (the release's SiT-SRA_DTS_AS/loss.py):

        sra: group g at t_g − Δ_g (Δ_g drawn per image and group), the student's groups and separation;
        same: the student's input, times and groups;
        self_flow: the whole image at t_min, the smallest group time; with --teacher-mask the first
        group's tokens are noised to t_min and the other groups' tokens are clean (noise level 0), all
        conditioned on t_min, with the student's groups (as the release does).
        The teacher's labels are --teacher-labels' (by default those before CFG dropout, as the release's).
        """
        drawn, objective, config = inputs.groups, self.objective, self.config
        groups = drawn.groups if config.teacher_mask else None
        if config.teacher_t == "self_flow":
            t_teacher = drawn.times.min(dim=1).values  # (N,)
            if config.teacher_mask:
                levels = torch.zeros_like(drawn.times)
                levels[:, 0] = t_teacher
                where = drawn.time_map(levels)
            else:
                where = t_teacher
        else:
            t_teacher = drawn.times
            if config.teacher_t == "sra":
                n, num_groups = drawn.times.shape
                # Δ for every image of group 0, then of group 1, …: the release's order of draws
                delta = draw_delta(objective, n * num_groups, config.t_max, config.interval == "fixed",
                                   drawn.times.device).view(num_groups, n).T
                t_teacher = objective.shift_time(drawn.times, delta)
            where = drawn.time_map(t_teacher)
        x_teacher = objective.noisy(inputs.x0, inputs.eps, where)
        with self.teacher_precision():
            return self.teacher.forward_features(x_teacher, objective.model_time(t_teacher),
                                                 self.teacher_condition(inputs), config.teacher_depth, groups)
