import pytest
import torch

import models
import sra
from errors import UserError
from guidance import AlignmentInputs, GuidanceContext, Student, TrainingLoss, align_weight, token_distance
from objectives.registry import create_objective, objective_for_model
from tests.helpers import tiny_model
from training.ema import EMA


def batch(n=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def make_parts(name="SiT-S/2", student_depth=1, teacher_depth=2, t_max=0.2, distance="smooth_l1", dropout=0.1,
               **options):
    backbone = tiny_model(name, class_dropout_prob=dropout)
    ema = EMA(backbone, decay=0.9)
    objective = objective_for_model(name)
    config = sra.SRAConfig(student_depth=student_depth, teacher_depth=teacher_depth, t_max=t_max,
                           align_distance=distance, **options)
    method = sra.SRA(config, GuidanceContext(objective, ema.model, backbone, torch.device("cpu")))
    student = Student(backbone, method.build_head(backbone.hidden_size), student_depth)
    return student, ema, TrainingLoss(objective, dropout, backbone.num_classes, method)


def identity_head_(head):
    """SiLU(h) − SiLU(−h) = h: a head that is exactly the identity up to rounding."""
    dim = head.linear2.out_features
    eye = torch.eye(dim)
    with torch.no_grad():
        head.linear1.weight.copy_(torch.cat([eye, -eye]))
        head.linear1.bias.zero_()
        head.linear2.weight.copy_(torch.cat([eye, -eye], dim=1))
        head.linear2.bias.zero_()


@pytest.mark.parametrize("name, linear_init", [("SiT-S/2", "xavier"), ("DiT-S/2", "xavier"),
                                               ("MMDiT-D6/2", "default")])
def test_head_starts_as_the_backbones_linear_layers(name, linear_init):
    """The releases build the head into their SiT/DiT, whose init gives every Linear Xavier-uniform weights
    and zero biases; on REPA's MMDiT, which initializes nothing, the head keeps PyTorch's default."""
    torch.manual_seed(0)
    backbone = models.create_model(name, input_size=8, num_classes=0 if name.startswith("MMDiT") else 10,
                                   depth=2, hidden_size=64, num_heads=2)
    method = sra.SRA(sra.SRAConfig(student_depth=1, teacher_depth=2),
                     GuidanceContext(create_objective("flow"), backbone, backbone, torch.device("cpu")))
    head = method.build_head(64)
    assert backbone.linear_init == method.linear_init == linear_init
    for layer in (head.linear1, head.linear2):
        fan_in, fan_out = layer.in_features, layer.out_features
        largest, bias = float(layer.weight.detach().abs().max()), float(layer.bias.detach().abs().max())
        # Xavier-uniform: U(±√(6/(in+out))); PyTorch's default: U(±1/√in), biases too
        bound = (6 / (fan_in + fan_out)) ** 0.5 if linear_init == "xavier" else fan_in ** -0.5
        assert 0.95 * bound < largest <= bound
        assert (bias == 0) == (linear_init == "xavier")


def test_teacher_gets_no_gradients_and_builds_no_graph():
    student, ema, loss_fn = make_parts()
    x0, y = batch()
    seen = {}
    original = ema.model.forward_features

    def spy(*args, **kwargs):
        seen["out"] = original(*args, **kwargs)
        return seen["out"]

    ema.model.forward_features = spy
    terms = loss_fn(student, x0, y, weight=0.2)
    terms["loss"].backward()
    assert not seen["out"].requires_grad and seen["out"].grad_fn is None
    assert all(p.grad is None for p in ema.model.parameters())
    assert all(p.grad is not None for p in student.head.parameters())
    assert not ema.model.training


@pytest.mark.parametrize("name", ["SiT-S/2", "DiT-S/2"])
def test_teacher_features_are_the_partial_forward_at_the_shifted_time(name):
    student, ema, loss_fn = make_parts(name, teacher_depth=2)
    method, objective = loss_fn.guidance, loss_fn.objective
    x0, y = batch()
    eps = torch.randn_like(x0)
    t = objective.sample_time(4, "cpu")
    torch.manual_seed(7)
    features = method.target(AlignmentInputs(x0, eps, t, y, None))
    torch.manual_seed(7)  # draw the same Δ again
    t_teacher = objective.shift_time(t, sra.draw_delta(objective, 4, 0.2, False, "cpu"))
    assert (t_teacher <= t).all() and (t_teacher >= 0).all()
    captured = {}
    ema.model.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    ema.model(objective.noisy(x0, eps, t_teacher), objective.model_time(t_teacher), y)
    assert torch.equal(features, captured["h"])


@pytest.mark.parametrize("teacher_labels", ["dropped", "clean"])
def test_teacher_sees_the_students_dropped_labels(teacher_labels):
    student, ema, loss_fn = make_parts(dropout=0.5, teacher_labels=teacher_labels)
    labels = {}
    original_student, original_teacher = student.forward, ema.model.forward_features

    def student_spy(x, t, y, groups=None):
        labels["student"] = y
        return original_student(x, t, y, groups)

    def teacher_spy(x, t, y, depth, groups=None):
        labels["teacher"] = y
        return original_teacher(x, t, y, depth, groups)

    student.forward, ema.model.forward_features = student_spy, teacher_spy
    x0, y = batch(n=64)
    loss_fn(student, x0, y, weight=0.2)
    assert torch.equal(labels["teacher"], labels["student"] if teacher_labels == "dropped" else y)
    dropped = labels["student"] == student.backbone.num_classes
    assert 0 < dropped.sum() < 64  # some labels dropped, some kept
    assert torch.equal(labels["student"][~dropped], y[~dropped])


@pytest.mark.parametrize("distance", sra.DISTANCES)
def test_alignment_is_zero_for_identical_features_through_an_identity_head(distance):
    # Student block k equals teacher block k when the weights are equal and Δ = 0.
    student, ema, loss_fn = make_parts(student_depth=2, teacher_depth=2, t_max=0.0, distance=distance)
    identity_head_(student.head)
    terms = loss_fn(student, *batch(), weight=0.2)
    floor = -1.0 if distance == "neg_cosine" else 0.0  # REPA's −cos is −1 at equality
    assert terms["align"].item() == pytest.approx(floor, abs=1e-6)


@pytest.mark.parametrize("name", ["SiT-S/2", "DiT-S/2"])
def test_loss_is_gen_plus_weight_times_align_when_align_is_not_zero(name):
    student, ema, loss_fn = make_parts(name)
    x0, y = batch()
    torch.manual_seed(5)
    terms = loss_fn(student, x0, y, weight=0.37)
    # Recompute every term from the same random draws, in the loss's order.
    objective, method = loss_fn.objective, loss_fn.guidance
    torch.manual_seed(5)
    y_dropped = models.drop_labels(y, 0.1, 10)
    t = objective.sample_time(4, "cpu")
    eps = torch.randn_like(x0)
    x_t = objective.noisy(x0, eps, t)
    prediction, tokens = student.backbone.forward_with_features(x_t, objective.model_time(t), y_dropped, 1)
    gen = objective.loss(prediction, x0, eps, t, x_t).mean()
    target = method.target(AlignmentInputs(x0, eps, t, y_dropped, None))
    align = token_distance(student.head(tokens), target, "smooth_l1").mean()
    assert align.item() > 1e-3  # a real alignment term, so a loss that dropped λ would fail
    assert torch.equal(terms["gen"], gen.detach()) and torch.equal(terms["align"], align.detach())
    assert torch.equal(terms["loss"], gen + 0.37 * align)


def test_distances_reduce_over_the_feature_dimension():
    target = torch.randn(2, 5, 16)
    scaled = target * torch.rand(2, 5, 1).add(0.5)  # every token rescaled: same direction
    assert torch.allclose(token_distance(scaled, target, "cosine"), torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(token_distance(scaled, target, "neg_cosine"), -torch.ones(2, 5), atol=1e-6)
    assert (token_distance(scaled, target, "l2") > 0).all()
    # Closed forms for one token.
    a, b = torch.tensor([[[0.0, 0.01, 1.0]]]), torch.zeros(1, 1, 3)
    beta = sra.SMOOTH_L1_BETA
    expected = (0.0 + 0.5 * 0.01**2 / beta + (1.0 - 0.5 * beta)) / 3
    assert token_distance(a, b, "smooth_l1").item() == pytest.approx(expected, rel=1e-6)
    assert token_distance(a, b, "l1").item() == pytest.approx(1.01 / 3, rel=1e-6)
    assert token_distance(a, b, "l2").item() == pytest.approx((0.01**2 + 1) / 3, rel=1e-6)
    with pytest.raises(UserError, match="--align-distance cos: choose one of"):
        sra.SRAConfig(align_distance="cos")


def test_ema_update_math():
    backbone = tiny_model()
    ema = EMA(backbone, decay=0.75)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    ema.update(backbone, apply=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.model.parameters()))
    ema.update(backbone, apply=torch.tensor(True))
    for old, new, source in zip(before, ema.model.parameters(), backbone.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * source, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_release_weight_schedule():
    assert align_weight(10**6) == sra.ALIGN_WEIGHT
    spe = 100
    assert align_weight(149 * spe, "release", 0.2, spe) == 0.2
    assert align_weight(1149 * spe, "release", 0.2, spe) == pytest.approx(0.02)
    assert align_weight(649 * spe + 99, "release", 0.2, spe) == pytest.approx(0.2 * 0.1**0.5)
    config = sra.SRAConfig(align_weight_schedule="release", align_decay_start_epoch=9, align_decay_epochs=10)
    assert config.weight(19 * spe, spe) == pytest.approx(0.02)


def test_no_guidance_is_the_plain_objective():
    backbone = tiny_model(class_dropout_prob=0.1)
    objective = create_objective("flow")
    loss_fn = TrainingLoss(objective, 0.1, 10, guidance=None)
    x0, y = batch()
    torch.manual_seed(3)
    terms = loss_fn(Student(backbone), x0, y, weight=0.2)
    torch.manual_seed(3)
    y_dropped = models.drop_labels(y, 0.1, 10)
    t = objective.sample_time(4, "cpu")
    eps = torch.randn_like(x0)
    x_t = objective.noisy(x0, eps, t)
    expected = objective.loss(backbone(x_t, objective.model_time(t), y_dropped), x0, eps, t, x_t).mean()
    assert torch.equal(terms["loss"], expected) and terms["align"].item() == 0


def test_default_block_pairs():
    assert sra.default_block_pair("SiT-XL/2") == (8, 20)
    assert sra.default_block_pair("DiT-XL/2") == (8, 16)
    assert sra.default_block_pair("SiT-B/2") == (3, 8)
    assert sra.default_block_pair("SiT-T/2") == (2, 5)  # ¼ and ¾ of 6 blocks, rounded
    resolved = sra.SRAConfig().resolved_for("SiT-XL/2", 28)
    assert (resolved.student_depth, resolved.teacher_depth) == (8, 20)


def test_delta_on_integer_steps():
    objective = create_objective("ddpm")
    generator = torch.Generator().manual_seed(0)
    delta = sra.draw_delta(objective, 20000, 0.2, False, "cpu", generator)
    assert delta.dtype == torch.long and int(delta.min()) == 0 and int(delta.max()) == 199
    # The release's torch.randint(0, ⌊T·t_max⌋), exactly: the same draws from the same generator.
    assert torch.equal(delta, torch.randint(0, 200, (20000,), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(sra.draw_delta(objective, 2, 0.2, True, "cpu"), torch.tensor([200, 200]))
    assert int(sra.draw_delta(objective, 1, 0.29, True, "cpu")) == 290  # not 289 from 1000 * 0.29
    with pytest.raises(UserError, match="leaves no step"):
        sra.draw_delta(objective, 2, 0.0005, False, "cpu")


def test_delta_in_continuous_time():
    objective = create_objective("flow")
    generator = torch.Generator().manual_seed(0)
    delta = sra.draw_delta(objective, 10000, 0.2, False, "cpu", generator)
    assert delta.dtype == torch.float32 and 0 <= float(delta.min()) and float(delta.max()) < 0.2
    assert torch.equal(delta, 0.2 * torch.rand(10000, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(sra.draw_delta(objective, 3, 0.2, True, "cpu"), torch.full((3,), 0.2))


@pytest.mark.parametrize("floor", [0, 1])
def test_dit_teacher_floor(floor):
    student, ema, loss_fn = make_parts("DiT-S/2", dit_teacher_min_step=floor)
    method = loss_fn.guidance
    t = torch.tensor([0, 0, 3, 500])
    torch.manual_seed(0)
    t_teacher = method.teacher_time(t, 4, "cpu")
    torch.manual_seed(0)
    delta = sra.draw_delta(loss_fn.objective, 4, 0.2, False, "cpu")
    assert torch.equal(t_teacher, (t - delta).clamp(floor, 999))
    # The release's quirk: with the floor at 1, a student at t = 0 gets a teacher at step 1.
    assert int(t_teacher[0]) == floor


def test_block_pair_and_interval_checks():
    with pytest.raises(UserError, match="--teacher-depth 2 is shallower than --student-depth 5"):
        sra.SRAConfig(student_depth=5, teacher_depth=2).resolved_for("SiT-T/2", 6)
    with pytest.raises(UserError, match=r"--teacher-depth 0: must be >= 1"):
        sra.SRAConfig(teacher_depth=0)
    with pytest.raises(UserError, match=r"--teacher-depth 9 is outside SiT-T/2's blocks 1..6"):
        sra.SRAConfig(teacher_depth=9).resolved_for("SiT-T/2", 6)
    with pytest.raises(UserError, match=r"--t-max 1.5: must be <= 1"):
        sra.SRAConfig(t_max=1.5)
    with pytest.raises(UserError, match="leaves no step"):
        sra.SRAConfig(t_max=0.0005).resolved_for("DiT-T/2", 6)
    sra.SRAConfig(t_max=0.0005).resolved_for("SiT-T/2", 6)  # continuous time: any t_max in [0, 1]
