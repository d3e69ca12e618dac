"""The paper's ablations that need their own switches (SPEC §6): the projection head off (Table 3.2,
"PH.") and the teacher's update rule (Appendix F), with the sampled EMA untouched by the latter."""
import math

import pytest
import torch

import train
from configs.cli import parse
from errors import UserError
from guidance import GuidanceContext, Student, TrainingLoss
from sra import SRA, SRAConfig
from sra.method import SSL_MOMENTUM_START
from tests.helpers import tiny_model
from tests.test_train import FAST
from training.checkpoints import read_checkpoint
from transport.objective import FlowObjective


def test_without_the_head_the_raw_student_tokens_are_aligned():
    backbone, teacher = tiny_model("SiT-S/2", seed=0).train(), tiny_model("SiT-S/2", seed=1).eval()
    config = SRAConfig(projection_head=False, align_distance="l2", student_depth=1, teacher_depth=2)
    method = SRA(config, GuidanceContext(FlowObjective(), teacher, backbone, torch.device("cpu")))
    assert method.build_head(backbone.hidden_size) is None
    student = Student(backbone, None, 1)
    x0, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    torch.manual_seed(0)
    terms = TrainingLoss(FlowObjective(), 0.0, 10, method)(student, x0, y, weight=0.5)
    # replay the draws: t, ε, then Δ
    torch.manual_seed(0)
    t = torch.rand(4)
    eps = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    t_teacher = (t - 0.2 * torch.rand(4)).clamp(min=0)
    x_teacher = (1 - t_teacher.view(-1, 1, 1, 1)) * x0 + t_teacher.view(-1, 1, 1, 1) * eps
    tokens = backbone.forward_features(x_t, t, y, 1)
    target = teacher.forward_features(x_teacher, t_teacher, y, 2)
    expected = (tokens - target).pow(2).mean()
    assert expected > 1e-4
    torch.testing.assert_close(terms["align"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k, m", [(0, SSL_MOMENTUM_START), (50, (1 + SSL_MOMENTUM_START) / 2), (100, 1.0),
                                  (25, 1 - (1 - SSL_MOMENTUM_START) * (math.cos(math.pi / 4) + 1) / 2),
                                  (150, 1.0)])
def test_the_ssl_schedule_is_dinos_cosine(k, m):
    config = SRAConfig(teacher_update="ssl_cosine", teacher_momentum_steps=100)
    assert config.teacher_momentum(k) == pytest.approx(m, abs=1e-15)
    assert SRAConfig(teacher_update="copy").teacher_momentum(k) == 0.0


def test_the_schedule_length_is_the_run_and_is_recorded():
    _, config = parse(["--teacher-update", "ssl_cosine", "--max-steps", "1000"])
    assert config.guidance.teacher_momentum_steps == 1000 and config.guidance.own_teacher
    assert config.to_dict()["guidance"]["teacher_momentum_steps"] == 1000
    _, default = parse([])
    assert not default.guidance.own_teacher and default.guidance.teacher_momentum_steps is None


@pytest.mark.parametrize("argv, message", [
    (["--teacher-momentum-start", "0.99"], "--teacher-momentum-start applies only with --teacher-update ssl_cosine"),
    (["--teacher-update", "copy", "--teacher-momentum-steps", "10"], "--teacher-momentum-steps applies only with"),
    (["--guidance", "repa", "--projection-head", "off"], "--projection-head does not apply to --guidance repa"),
    (["--teacher-update", "momentum"], "invalid choice: 'momentum'"),
])
def test_refused_ablation_flags(argv, message):
    with pytest.raises(UserError, match=message):
        parse(argv)


def run(tmp_path, data_dir, *extra):
    return train.main([*FAST, "--data-dir", data_dir, "--results-dir", str(tmp_path), "--sample-every", "0",
                       "--ckpt-every", "1", "--keep-last", "3", *extra])


def test_no_head_is_trained_or_saved(tmp_path, data_dir):
    result = run(tmp_path, data_dir, "--max-steps", "2", "--projection-head", "off")
    assert result["student"].head is None
    state = read_checkpoint(tmp_path / "debug" / "checkpoints" / "step_0000002.pt")
    assert state["head"] is None and not any(key.startswith("head") for key in state["model"])


def test_a_copied_teacher_is_the_student_and_the_sampled_ema_keeps_its_decay(tmp_path, data_dir):
    result = run(tmp_path, data_dir, "--max-steps", "3", "--teacher-update", "copy", "--ema-decay", "0.5")
    states = [read_checkpoint(tmp_path / "debug" / "checkpoints" / f"step_{s:07d}.pt") for s in (2, 3)]
    for state in states:  # m = 0: after every step the teacher equals the student exactly
        for key, value in state["model"].items():
            assert torch.equal(state["teacher"][key], value), key
    before, after = states
    moved = False
    for key, value in after["ema"].items():  # the sampled EMA: m = --ema-decay, from the student
        expected = torch.lerp(before["ema"][key], after["model"][key], 0.5)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
        moved |= not torch.equal(value, after["model"][key])
    assert moved  # and it is not the teacher
    assert result["ema"].decay == 0.5


def test_a_scheduled_teacher_resumes_identically_and_refuses_another_length(tmp_path, data_dir):
    flags = ["--teacher-update", "ssl_cosine", "--teacher-momentum-start", "0.5"]
    straight = run(tmp_path / "a", data_dir, "--max-steps", "4", *flags)
    run(tmp_path / "b", data_dir, "--max-steps", "4", *flags, "--teacher-momentum-steps", "4")
    # the same run stopped at step 2 and resumed (K pinned to the straight run's 4)
    run(tmp_path / "c", data_dir, "--max-steps", "2", *flags, "--teacher-momentum-steps", "4")
    resumed = run(tmp_path / "c", data_dir, "--max-steps", "4", *flags, "--teacher-momentum-steps", "4")
    a = read_checkpoint(tmp_path / "a" / "debug" / "checkpoints" / "step_0000004.pt")
    c = read_checkpoint(tmp_path / "c" / "debug" / "checkpoints" / "step_0000004.pt")
    for part in ("model", "ema", "teacher", "head"):
        for key, value in a[part].items():
            assert torch.equal(value, c[part][key]), (part, key)
    key = "final_layer.linear.weight"
    assert not torch.equal(a["teacher"][key], a["ema"][key])  # two EMAs: the scheduled teacher, the sampled one
    b = read_checkpoint(tmp_path / "b" / "debug" / "checkpoints" / "step_0000004.pt")
    assert b["config"]["guidance"]["teacher_momentum_steps"] == a["config"]["guidance"]["teacher_momentum_steps"] == 4
    del straight, resumed
    run(tmp_path / "d", data_dir, "--max-steps", "2", *flags)  # K defaults to --max-steps: 2
    with pytest.raises(UserError, match="guidance.teacher_momentum_steps: 2 -> 4"):
        run(tmp_path / "d", data_dir, "--max-steps", "4", *flags)  # a longer run would change the schedule
