"""From a resolved TrainConfig and a dataset to the pieces of a run: what the data adds to the config,
the model, its EMA, the objective, the guidance method, the loss and the optimizer."""
import dataclasses
import types
from pathlib import Path

import torch

import models
from conditioning import CLASS, of_dataset
from configs.fields import flag_name
from configs.schema import OutputConfig
from dts import TokenGrouping
from errors import UserError
from guidance import GuidanceContext, Student, TrainingLoss
from guidance.registry import build_guidance
from objectives.registry import from_description
from training.ema import EMA
from training.parallel import prepare_student, shard

# Settings a resumed run may change: they decide where and how often things are written and how the
# same computation is scheduled, never what is computed. Any other difference is an error.
RESUMABLE = {
    "preset", "run.results_dir", "run.run_name", "run.num_workers", "run.restart", "run.data_dir",
    "optim.max_steps", "optim.compile", "optim.compile_mode",
    *(f"output.{field.name}" for field in dataclasses.fields(OutputConfig)),
}

# Settings added after runs were recorded: a record without one ran as if it had this value, so it
# resumes. (Token groups are recorded only when on; these two act only with them.)
ADDED_DATA_FACTS = {"data.condition": CLASS, "data.context_shape": None, "data.text_encoder": None,
                    "data.text_encoder_sha256": None}  # records made before text conditioning
ADDED_RUN_SETTINGS = {"optim.parallel": "ddp"}  # records made before --parallel
# Identities a resumed run may add (an evaluation turned on) but never change: FID rows against two
# reference sets would share one curve. Identity key -> the setting naming the file.
EVOLVING_IDENTITY = {"eval_ref_statistics_sha256": "output.eval_ref"}
ADDED_SETTINGS = {"guidance.teacher_t": "sra", "guidance.teacher_mask": True, "guidance.projection_head": True,
                  "guidance.teacher_update": "ema", "guidance.teacher_momentum_start": 0.996,
                  "guidance.teacher_momentum_steps": None, "guidance.teacher_precision": "step",
                  # records made before --teacher-labels: every run's teacher saw the dropped labels
                  "guidance.teacher_labels": "dropped"}


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What the dataset and the number of processes add to the config; recorded with the run."""

    input_size: int  # model input side (latent or pixel)
    in_channels: int
    num_classes: int
    num_samples: int
    dataset_checksum: str  # the dataset's identity by content (index.json's combined sha256)
    world_size: int
    per_gpu_batch_size: int
    steps_per_epoch: int
    condition: str = CLASS  # what the samples are conditioned on (conditioning/): class labels or text
    context_shape: list | None = None  # text: (L, D) of each caption's context
    text_encoder: str | None = None  # text: the encoder of the contexts, and its weights by content
    text_encoder_sha256: str | None = None


def data_facts(config, dataset, world_size) -> DataFacts:
    """The data-dependent settings, with every mismatch between the config and the data reported."""
    channels, height, width = dataset.meta["sample_shape"]
    wanted = config.family.condition
    if dataset.condition != wanted:
        how = ("preprocess the images with --captions and --text-encoder" if wanted != CLASS
               else "preprocess a class folder without --captions")
        raise UserError(f"{config.model.model} is conditioned on {wanted} but {dataset.root} holds "
                        f"{dataset.condition}-conditioned samples; {how}")
    if height != width:
        raise UserError(f"the model needs square inputs; {dataset.root} holds {height}×{width} samples")
    patch = models.parse_model_name(config.model.model)[2]
    if height % patch:
        raise UserError(f"{config.model.model} cuts {patch}×{patch} patches, which do not tile the dataset's "
                        f"{height}×{width} inputs")
    optim = config.optim
    per_step = world_size * optim.grad_accum_steps
    if optim.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {optim.global_batch_size} is not divisible by {world_size} "
                        f"processes × {optim.grad_accum_steps} accumulation steps")
    if len(dataset) < world_size:
        raise UserError(f"{dataset.root} holds {len(dataset)} samples, fewer than the {world_size} processes")
    return DataFacts(
        input_size=height, in_channels=channels, num_classes=dataset.meta["num_classes"],
        num_samples=len(dataset), dataset_checksum=dataset.meta["checksum"], world_size=world_size,
        per_gpu_batch_size=optim.global_batch_size // per_step,
        steps_per_epoch=max(len(dataset) // optim.global_batch_size, 1),
        condition=dataset.condition,
        context_shape=None if dataset.context_shape is None else list(dataset.context_shape),
        text_encoder=dataset.meta.get("text_encoder"), text_encoder_sha256=dataset.meta.get("text_encoder_sha256"),
    )


def run_record(config, facts: DataFacts, identity: dict) -> dict:
    """The run as config.json and every checkpoint hold it: the config, the data facts, and the content
    digests of anything else the run depends on (a frozen encoder's weights)."""
    return {**config.to_dict(), "data": dataclasses.asdict(facts), "identity": identity}


def _flat(record, prefix=""):
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_differences(saved: dict, record: dict) -> list[tuple[str, object, object]]:
    """(setting, saved value, new value) for every setting but the RESUMABLE ones in which a new record
    differs from a saved run's, in key order ('(absent)' where one lacks it). The data may move
    (run.data_dir) as long as its content (data.dataset_checksum) is the same; an EVOLVING_IDENTITY may be
    added or dropped."""
    added = {**ADDED_DATA_FACTS, **ADDED_RUN_SETTINGS}
    old, new = {**added, **_flat(saved)}, {**added, **_flat(record)}
    if old.get("guidance.method") == "sra":
        old = {**ADDED_SETTINGS, **old}
    for key in EVOLVING_IDENTITY:
        before, now = old.pop(f"identity.{key}", None), new.pop(f"identity.{key}", None)
        if before is not None and now is not None and before != now:
            old[f"identity.{key}"], new[f"identity.{key}"] = before, now
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE)
    return [(k, old.get(k, "(absent)"), new.get(k, "(absent)")) for k in changed]


def check_resumable(saved: dict, record: dict) -> None:
    """Refuse to continue a run whose saved record differs (resume_differences), naming what differs."""
    changed = resume_differences(saved, record)
    for key, before, now in changed:
        setting = EVOLVING_IDENTITY.get(key.removeprefix("identity."))
        if setting is not None:
            raise UserError(f"{flag_name(setting.split('.')[-1])} {_flat(record).get(setting)} has other content "
                            f"than the file this run's FID rows were computed against (sha256 {now[:12]}… vs "
                            f"{before[:12]}…), and one curve would mix two references; give that file, or use "
                            "another --run-name")
    if changed:
        details = ", ".join(f"{k}: {before!r} -> {now!r}" for k, before, now in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UserError(f"this run directory holds a run with a different config ({details}{more}); "
                        "use another --run-name, or the original flags")


def reference_identity(saved: dict) -> dict:
    """A saved record with its FID reference known by content. Records made before references were
    recorded name theirs by path (output.eval_ref): where that file still exists, its statistics are
    hashed now, so that resuming against other statistics is refused for those runs too."""
    output, identity = saved.get("output") or {}, saved.get("identity") or {}
    key = "eval_ref_statistics_sha256"
    if key in identity or not (output.get("eval_every") and output.get("eval_ref")):
        return saved
    path = Path(output["eval_ref"])
    if not path.is_file():
        return saved
    from training.fid import reference_sha256

    return {**saved, "identity": {**identity, key: reference_sha256(path)}}


def carry_identity(saved: dict, record: dict) -> None:
    """A resumed run without an evaluation keeps the reference its FID rows were computed against, so that
    turning the evaluation back on later is checked against it too."""
    for key in EVOLVING_IDENTITY:
        old = saved.get("identity", {}).get(key)
        if old is not None and record["identity"].get(key) is None:
            record["identity"][key] = old


def build_model(config, facts: DataFacts, condition):
    model = config.model
    return models.create_model(model.model, facts.input_size, facts.in_channels, qk_norm=model.qk_norm,
                               learn_sigma=model.learn_sigma, **condition.model_options(model.class_dropout_prob))


def build_run(config, facts: DataFacts, accelerator, dataset):
    """Model, EMA, objective, guidance, loss and optimizer, freshly initialized.

    `condition` (conditioning.Condition) is what the samples are conditioned on, with its null, on the device;
    `student` is the plain module (backbone and head) used for the EMA update and checkpoints;
    `trained` shares its parameters and runs the step (data-parallel); `teacher` is the EMA whose model
    the guidance method reads (`ema` itself, a separate one, or None without guidance)."""
    # Every process initializes the same weights (the EMA copy is taken before data parallelism
    # would broadcast them), then draws its own training noise.
    torch.manual_seed(config.run.seed)
    condition = of_dataset(dataset).to(accelerator.device)
    backbone = build_model(config, facts, condition)
    ema = EMA(backbone, config.optim.ema_decay)
    ema.model.to(accelerator.device)
    # The teacher is the sampled EMA, unless the method's teacher follows a rule of its own (SRA's
    # --teacher-update); then it is a second copy and the sampled EMA stays at --ema-decay.
    teacher = None
    if config.guidance is not None:
        teacher = ema
        if config.guidance.own_teacher:
            teacher = EMA(backbone, decay=0.0)
            teacher.model.to(accelerator.device)
    objective = from_description(config.objective_description())
    context = GuidanceContext(objective=objective, teacher=ema.model if teacher is None else teacher.model,
                              backbone=backbone, device=accelerator.device)
    guidance = build_guidance(config.guidance, context)
    head = guidance.build_head(backbone.hidden_size) if guidance is not None else None
    student = Student(backbone, head, guidance.student_depth if guidance is not None else None)
    torch.manual_seed(config.run.seed * accelerator.num_processes + accelerator.process_index)
    trained = prepare_student(student, accelerator, config.optim.parallel)
    if config.optim.parallel == "fsdp":
        shard(ema.model, ema.model, forward_only=True)
        if teacher is not None and teacher is not ema:
            shard(teacher.model, teacher.model, forward_only=True)
    optim = config.optim
    optimizer = torch.optim.AdamW(student.parameters(), lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                  weight_decay=optim.weight_decay, fused=True)
    grouping = None
    if config.groups.enabled:
        grouping = TokenGrouping(config.groups, objective, backbone.num_patches, backbone.patch_size)
    loss_fn = TrainingLoss(objective, config.model.class_dropout_prob, condition, guidance, grouping)
    return types.SimpleNamespace(condition=condition, student=student, trained=trained, ema=ema, teacher=teacher,
                                 objective=objective,
                                 guidance=guidance, loss_fn=loss_fn, optimizer=optimizer,
                                 scaler=accelerator.scaler)


def compile_run(parts, config):
    """torch.compile of the step's student and of the teacher's partial forward (--compile, --compile-mode)."""
    if config.optim.compile:
        mode = config.optim.compile_mode
        parts.trained = torch.compile(parts.trained, mode=mode)
        if parts.teacher is not None:
            parts.teacher.model.forward_features = torch.compile(parts.teacher.model.forward_features, mode=mode)
