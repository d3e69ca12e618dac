"""SRA as a guidance method (SPEC §3): the target is the EMA teacher's block-k_T tokens at a lower noise
level, from the same x0 and ε and the student's dropped labels; only the first k_T blocks run."""
import dataclasses

from configs.fields import option
from diffusion.ddpm import NUM_TIMESTEPS, DDPMObjective
from errors import UserError
from guidance.base import AlignmentConfig, AlignmentInputs, Guidance, GuidanceContext
from guidance.distances import DISTANCES
from models import family_of

from .defaults import T_MAX, default_block_pair
from .head import ProjectionHead
from .interval import INTERVALS, check_interval, draw_delta

ALIGN_WEIGHT = 0.2  # λ, paper §3 (constant)
RELEASE_DIT_TEACHER_MIN_STEP = 1  # the DiT release clamps t − Δ at step 1 (SPEC §3 step 1)


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

    @classmethod
    def default_student_depth(cls, model_name):
        return default_block_pair(model_name)[0]

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

    def build_head(self, hidden_size):
        return ProjectionHead(hidden_size)

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
        x0, objective = inputs.x0, self.objective
        t_teacher = self.teacher_time(inputs.t, x0.shape[0], x0.device)
        x_teacher = objective.noisy(x0, inputs.eps, t_teacher)
        return self.teacher.forward_features(x_teacher, objective.model_time(t_teacher), inputs.y,
                                             self.config.teacher_depth)
