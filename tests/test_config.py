"""The typed training config: flags and presets resolve once into frozen sections, and every flag the
chosen model family or guidance method would ignore is refused."""
import dataclasses
import json

import pytest

import configs
import models
from configs import cli
from configs.schema import TrainConfig
from errors import UserError
from objectives.registry import from_description
from repa import REPAConfig
from sra import SRAConfig


def resolve(*argv):
    return cli.parse(list(argv))[1]


def test_defaults_are_the_papers():
    config = resolve()
    assert config.model.model == "SiT-B/2" and config.method == "sra"
    assert isinstance(config.guidance, SRAConfig)
    assert (config.guidance.student_depth, config.guidance.teacher_depth) == (3, 8)  # SPEC §3 table
    assert (config.guidance.t_max, config.guidance.align_weight, config.guidance.align_distance) == (
        0.2, 0.2, "smooth_l1")
    assert (config.optim.lr, config.optim.global_batch_size, config.optim.ema_decay) == (1e-4, 256, 0.9999)
    assert config.model.learn_sigma is False  # SiT's family default
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0


@pytest.mark.parametrize("preset", configs.PRESET_NAMES)
def test_every_preset_resolves_and_round_trips_through_json(preset):
    config = resolve("--preset", preset)
    record = json.loads(json.dumps(config.to_dict()))
    assert record["preset"] == preset and record["guidance"]["method"] == config.method
    objective = from_description(record["objective"])
    assert objective.name == models.family_of(config.model.model).objective


def test_repa_presets_carry_repas_settings():
    xl, b = resolve("--preset", "sit-xl2-repa"), resolve("--preset", "sit-b2-repa")
    for config in (xl, b):
        assert isinstance(config.guidance, REPAConfig)
        assert (config.guidance.align_weight, config.guidance.align_distance) == (0.5, "neg_cosine")
        assert (config.guidance.repa_encoder, config.guidance.repa_projector_dim) == ("dinov2-vit-b", 2048)
    assert (xl.guidance.student_depth, b.guidance.student_depth) == (8, 4)
    assert xl.optim.max_steps == 4_000_000 and b.optim.max_steps == 400_000


@pytest.mark.parametrize("argv, message", [
    (["--model", "DiT-T/2", "--path", "cosine"], "--path applies to SiT/MMDiT models, not DiT-T/2"),
    (["--model", "DiT-T/2", "--time-sampling", "lognormal"], "--time-sampling applies to SiT/MMDiT models"),
    (["--dit-teacher-min-step", "1"], "--dit-teacher-min-step applies to DiT models, not SiT-B/2"),
    (["--guidance", "repa", "--teacher-depth", "8"], "--teacher-depth does not apply to --guidance repa"),
    (["--guidance", "none", "--t-max", "0.1"], "--t-max does not apply to --guidance none"),
    (["--guidance", "none", "--align-weight", "0.1"], "--align-weight does not apply to --guidance none"),
    (["--repa-encoder", "dinov2-vit-l"], "--repa-encoder does not apply to --guidance sra"),
    (["--sra", "off", "--guidance", "repa"], "--sra off contradicts --guidance repa"),
    (["--teacher-depth", "0"], "--teacher-depth 0: must be >= 1"),
    (["--student-depth", "5", "--teacher-depth", "2"], "--teacher-depth 2 is shallower than --student-depth 5"),
    (["--t-max", "1.5"], "--t-max 1.5: must be <= 1"),
    (["--lr", "-1e-3"], "--lr -0.001: must be > 0"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--global-batch-size", "0"], "--global-batch-size 0: must be >= 1"),
    (["--ckpt-every", "0"], "--ckpt-every 0: must be >= 1"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--keep-last", "0"], "--keep-last 0: must be >= 1"),
    (["--ema-decay", "1.5"], "--ema-decay 1.5: must be <= 1"),
    (["--class-dropout-prob", "1"], "--class-dropout-prob 1.0: must be <= 0.99"),
    (["--eval-every", "10"], "--eval-every needs --eval-ref"),
    (["--eval-ref", "ref.npz"], "--eval-ref applies only with --eval-every"),
    (["--sample-every", "0", "--sample-grid-size", "4"], "--sample-grid-size applies only with --sample-every"),
    (["--sample-every", "0", "--vae", "ema"], "--vae applies only with --sample-every or --eval-every"),
    # nan fails every comparison, so a range check alone would let it through
    (["--t-max", "nan"], "--t-max nan: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--align-weight", "inf"], "--align-weight inf: must be a finite number"),
    (["--max-grad-norm", "nan"], "--max-grad-norm nan: must be a finite number"),
    (["--mask-ratio", "0.5,nan", "--attention-separation", "on"], "shares must be finite numbers"),
])
def test_refused_flags_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(*argv)


def test_preset_values_of_another_method_are_dropped_not_refused():
    config = resolve("--preset", "sit-xl2-512-sra", "--guidance", "none")
    assert config.guidance is None and config.model.model == "SiT-XL/2"


def test_sra_flag_is_an_alias_of_guidance():
    assert resolve("--sra", "off").guidance is None
    assert resolve("--sra", "on").method == "sra"
    assert resolve("--preset", "sit-b2", "--sra", "on").method == "sra"
    assert resolve("--preset", "sit-b2-sra", "--guidance", "none").guidance is None


def test_dit_without_learned_sigma_gets_a_matching_objective():
    config = resolve("--model", "DiT-T/2", "--learn-sigma", "off")
    assert config.model.learn_sigma is False
    objective = from_description(config.objective_description())
    assert objective.name == "ddpm" and objective.diffusion.learn_sigma is False
    model = models.create_model("DiT-T/2", 8, 4, 10, learn_sigma=config.model.learn_sigma)
    assert model.out_channels == 4  # 4 channels against an objective that expects 4
    assert resolve("--model", "DiT-T/2").objective_description() == {"kind": "ddpm", "learn_sigma": True}


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data-dir DIR dataset written by `python -m preprocessing` (required)" in text
    assert "(default: 0.0001)" in text  # --lr
    assert "(default: sra 0.2, repa 0.5)" in text  # --align-weight differs by method
    assert "(default: linear; SiT/MMDiT models only)" in text  # --path


def test_to_dict_sections():
    config = resolve("--guidance", "repa", "--model", "SiT-S/2")
    record = config.to_dict()
    assert set(record) == {"preset", "run", "model", "objective", "optim", "output", "guidance"}
    assert record["guidance"]["method"] == "repa" and record["guidance"]["student_depth"] == 4  # ⅓ of 12
    assert "teacher_depth" not in record["guidance"]
    assert isinstance(config, TrainConfig)
