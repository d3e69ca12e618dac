"""The training config as frozen dataclasses, one per concern, each field with its default and help.

`configs.cli` turns flags and presets into a `TrainConfig`, validated once; everything downstream
reads typed values. The guidance section is the chosen method's own config class (guidance/, sra/,
repa/), or None for the baseline.
"""
import dataclasses

from dts.config import TokenGroupsConfig
from errors import UserError
from models import MODEL_NAMES, family_of, model_shape
from training.parallel import STRATEGIES as PARALLEL_STRATEGIES
from training.parallel import check_settings
from transport.objective import TIME_SAMPLINGS
from transport.paths import PATHS
from transport.predictions import PREDICTIONS

from .fields import check_range, option

STEPS_400K = 400_000  # the paper's ablation length (§4, Table 3.2)
EMA_DECAY = 0.9999  # paper main text and release (the paper's appendix table says 0.999)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")  # torch.compile's


class Section:
    """Checks every field's range and choices once, when the section is made."""

    def __post_init__(self):
        problem = check_range(self)
        if problem:
            raise UserError(problem)


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    data_dir: str | None = option(None, "dataset written by `python -m preprocessing` (required)", type=str)
    results_dir: str = option("results", "runs go to RESULTS_DIR/RUN_NAME")
    run_name: str | None = option(None, "run directory name (default: the preset or the model name)", type=str)
    seed: int = option(0, "global seed; process r of W draws its noise from seed·W + r", minimum=0)
    num_workers: int = option(4, "data loader worker processes per training process", minimum=0)
    restart: bool = option(False, "start from step 0 although the run directory holds checkpoints that "
                                  "cannot be read (they are kept)")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    model: str = option("SiT-B/2", "backbone, {DiT,SiT}-{T,S,B,L,XL}/{2,4,8} (class labels) or MMDiT-D{6,12,24}/"
                        "{2,4,8} (text); DiT trains with DDPM, SiT and MMDiT with flow matching", choices=MODEL_NAMES)
    class_dropout_prob: float = option(0.1, "condition dropout for classifier-free guidance: the label, or the "
                                       "caption (SPEC §1, §8)", minimum=0.0, maximum=0.99)
    qk_norm: bool = option(False, "LayerNorm on queries and keys (REPA's SiT option)")
    learn_sigma: bool | None = option(None, "predict the variance range too (default: DiT on, SiT off)", type=bool)

    @property
    def depth(self) -> int:
        return model_shape(self.model)[0]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(Section):
    """The flow objective's options (SPEC §2); DDPM takes none from the command line."""

    path: str = option("linear", "flow interpolant", choices=tuple(PATHS), objective="flow")
    prediction: str = option("velocity", "flow model output", choices=PREDICTIONS, objective="flow")
    time_sampling: str = option("uniform", "flow training times", choices=TIME_SAMPLINGS, objective="flow")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    max_steps: int = option(STEPS_400K, "optimizer steps of the whole run", minimum=1)
    global_batch_size: int = option(256, "images per optimizer step over all processes (SPEC §4)", minimum=1)
    grad_accum_steps: int = option(1, "micro-batches per optimizer step", minimum=1)
    lr: float = option(1e-4, "AdamW learning rate, constant (SPEC §4)", minimum=0.0, exclusive_minimum=True)
    adam_beta1: float = option(0.9, "AdamW β1", minimum=0.0, maximum=0.999999)
    adam_beta2: float = option(0.999, "AdamW β2", minimum=0.0, maximum=0.999999)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0.0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", minimum=0.0, exclusive_minimum=True)
    ema_decay: float = option(EMA_DECAY, "EMA decay m: the sampled weights and SRA's teacher", minimum=0.0,
                              maximum=1.0)
    mixed_precision: str = option("bf16", "autocast precision (fp16 with loss scaling)",
                                  choices=("bf16", "fp16", "no"))
    tf32: bool = option(True, "TF32 matmuls on the GPU")
    compile: bool = option(False, "torch.compile the student and the teacher's partial forward")
    compile_mode: str = option("default", "torch.compile's mode with --compile on (reduce-overhead and max-autotune "
                               "use CUDA graphs)", choices=COMPILE_MODES)
    parallel: str = option("ddp", "how processes share the model: ddp, a whole copy each (for models that fit), "
                           "or fsdp, the student, its optimizer state and the EMA sharded over the processes (FSDP2)",
                           choices=PARALLEL_STRATEGIES)
    max_nonfinite_steps: int = option(100, "stop after this many steps in a row with non-finite gradients "
                                           "(each is skipped)", minimum=1)

    def __post_init__(self):
        super().__post_init__()
        if self.compile_mode != "default" and not self.compile:
            raise UserError(f"--compile-mode {self.compile_mode} applies with --compile on")
        check_settings(self.parallel, self.mixed_precision, self.compile_mode)


@dataclasses.dataclass(frozen=True)
class OutputConfig(Section):
    log_every: int = option(100, "metrics every N steps (one host sync)", minimum=1)
    ckpt_every: int = option(10_000, "checkpoint every N steps", minimum=1)
    keep_last: int = option(2, "keep the newest K checkpoints", minimum=1)
    milestone_every: int = option(100_000, "also keep every checkpoint at a multiple of N (0: none)", minimum=0)
    sample_every: int = option(10_000, "EMA sample grid every N steps (0: never)", minimum=0)
    sample_grid_size: int = option(16, "images in a sample grid", minimum=1)
    sample_steps: int = option(50, "sampling steps of the grids", minimum=1)
    vae: str | None = option(None, "VAE to decode grids and FID samples (default: the dataset's)", type=str)
    eval_every: int = option(0, "FID-K of the EMA every N steps (0: never)", minimum=0)
    eval_ref: str | None = option(None, "reference statistics .npz (evaluations.evaluator --save-ref-stats)",
                                  type=str)
    eval_samples: int = option(10_000, "K, images per FID-K over all processes", minimum=2)
    eval_batch_size: int = option(125, "FID-K sampling batch per process", minimum=1)
    eval_steps: int = option(50, "sampling steps of the FID-K samples", minimum=1)
    wandb: bool = option(False, "log to Weights & Biases (WANDB_MODE=offline works without a network)")
    tensorboard: bool = option(True, "log to TensorBoard (metrics.jsonl is always written)")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_every and not self.eval_ref:
            raise UserError("--eval-every needs --eval-ref (reference statistics from evaluations.evaluator)")

    def unused_fields(self) -> dict[str, str]:
        """Fields the other values make irrelevant, each with the setting it needs (a flag given for one of
        them is refused, as a guidance method's are)."""
        unused = {}
        if not self.eval_every:
            unused.update(dict.fromkeys(("eval_ref", "eval_samples", "eval_batch_size", "eval_steps"),
                                        "--eval-every"))
        if not self.sample_every:
            unused.update(dict.fromkeys(("sample_grid_size", "sample_steps"), "--sample-every"))
        if not (self.sample_every or self.eval_every):
            unused["vae"] = "--sample-every or --eval-every (it decodes the grids and the FID samples)"
        return unused


SECTIONS = {
    "run": RunConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "groups": TokenGroupsConfig,
    "optim": OptimConfig,
    "output": OutputConfig,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is, resolved from a preset and flags (configs.cli.resolve)."""

    preset: str | None
    run: RunConfig
    model: ModelConfig
    objective: ObjectiveConfig
    groups: TokenGroupsConfig  # dual-time scheduling and attention separation (dts/)
    guidance: object  # the method's AlignmentConfig subclass, or None (the baseline)
    optim: OptimConfig
    output: OutputConfig

    @property
    def method(self) -> str:
        return "none" if self.guidance is None else self.guidance.method

    @property
    def family(self):
        return family_of(self.model.model)

    @property
    def run_name(self) -> str:
        return self.run.run_name or self.preset or self.model.model.replace("/", "")

    def objective_description(self) -> dict:
        """{"kind": …, **constructor options} of this run's objective (objectives.registry)."""
        if self.family.objective == "flow":
            return {"kind": "flow", **dataclasses.asdict(self.objective)}
        return {"kind": self.family.objective, "learn_sigma": self.model.learn_sigma}

    def to_dict(self) -> dict:
        """Nested plain values, as config.json and checkpoints hold them."""
        out = {"preset": self.preset}
        for name in ("run", "model", "optim", "output"):
            out[name] = dataclasses.asdict(getattr(self, name))
        if self.groups.enabled:  # absent otherwise, so records of runs without groups stay as they were
            out["groups"] = {**dataclasses.asdict(self.groups), "mask_ratio": list(self.groups.mask_ratio)}
        out["objective"] = self.objective_description()
        out["guidance"] = {"method": self.method}
        if self.guidance is not None:
            out["guidance"].update(dataclasses.asdict(self.guidance))
        return out
