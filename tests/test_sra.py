import pytest
import torch

import models
import sra
from diffusion import create_objective
from tests.helpers import tiny_model


def batch(n=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def make_parts(name="SiT-S/2", student_depth=1, teacher_depth=2, t_max=0.2, distance="smooth_l1", dropout=0.1):
    backbone = tiny_model(name, class_dropout_prob=dropout)
    head = sra.ProjectionHead(backbone.hidden_size)
    student = sra.Student(backbone, head, student_depth)
    ema = sra.EMATeacher(backbone, decay=0.9)
    objective = create_objective("ddpm" if name.startswith("DiT") else "flow")
    config = sra.SRAConfig(student_depth, teacher_depth, t_max, distance=distance)
    return student, ema, sra.TrainingLoss(objective, dropout, backbone.num_classes, config)


def identity_head_(head):
    """SiLU(h) − SiLU(−h) = h: a head that is exactly the identity up to rounding."""
    dim = head.linear2.out_features
    eye = torch.eye(dim)
    with torch.no_grad():
        head.linear1.weight.copy_(torch.cat([eye, -eye]))
        head.linear1.bias.zero_()
        head.linear2.weight.copy_(torch.cat([eye, -eye], dim=1))
        head.linear2.bias.zero_()


def test_teacher_gets_no_gradients_and_builds_no_graph():
    student, ema, loss_fn = make_parts()
    x0, y = batch()
    seen = {}
    original = ema.model.forward_features

    def spy(*args, **kwargs):
        seen["out"] = original(*args, **kwargs)
        return seen["out"]

    ema.model.forward_features = spy
    terms = loss_fn(student, ema.model, x0, y, weight=0.2)
    terms["loss"].backward()
    assert not seen["out"].requires_grad and seen["out"].grad_fn is None
    assert all(p.grad is None for p in ema.model.parameters())
    assert all(p.grad is not None for p in student.head.parameters())
    assert not ema.model.training


@pytest.mark.parametrize("name", ["SiT-S/2", "DiT-S/2"])
def test_teacher_features_are_the_partial_forward_at_the_shifted_time(name):
    student, ema, loss_fn = make_parts(name, teacher_depth=2)
    objective = loss_fn.objective
    x0, y = batch()
    eps = torch.randn_like(x0)
    t = objective.sample_time(4, "cpu")
    torch.manual_seed(7)
    features = loss_fn.teacher_features(ema.model, x0, eps, t, y)
    torch.manual_seed(7)  # draw the same Δ again
    t_teacher = objective.shift_time(t, objective.sample_delta(4, 0.2, False, "cpu"))
    assert (t_teacher <= t).all() and (t_teacher >= 0).all()
    captured = {}
    ema.model.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    ema.model(objective.noisy(x0, eps, t_teacher), objective.model_time(t_teacher), y)
    assert torch.equal(features, captured["h"])


def test_teacher_sees_the_students_dropped_labels():
    student, ema, loss_fn = make_parts(dropout=0.5)
    labels = {}
    original_student, original_teacher = student.forward, ema.model.forward_features

    def student_spy(x, t, y):
        labels["student"] = y
        return original_student(x, t, y)

    def teacher_spy(x, t, y, depth):
        labels["teacher"] = y
        return original_teacher(x, t, y, depth)

    student.forward, ema.model.forward_features = student_spy, teacher_spy
    x0, y = batch(n=64)
    loss_fn(student, ema.model, x0, y, weight=0.2)
    assert torch.equal(labels["student"], labels["teacher"])
    dropped = labels["student"] == student.backbone.num_classes
    assert 0 < dropped.sum() < 64  # some labels dropped, some kept
    assert torch.equal(labels["student"][~dropped], y[~dropped])


@pytest.mark.parametrize("distance", sra.DISTANCES)
def test_alignment_is_zero_for_identical_features_through_an_identity_head(distance):
    # Student block k equals teacher block k when the weights are equal and Δ = 0.
    student, ema, loss_fn = make_parts(student_depth=2, teacher_depth=2, t_max=0.0, distance=distance)
    identity_head_(student.head)
    terms = loss_fn(student, ema.model, *batch(), weight=0.2)
    assert terms["align"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["gen"].item() + 0.2 * terms["align"].item(), rel=1e-6)


def test_distances_reduce_over_the_feature_dimension():
    target = torch.randn(2, 5, 16)
    scaled = target * torch.rand(2, 5, 1).add(0.5)  # every token rescaled: same direction
    assert torch.allclose(sra.token_distance(scaled, target, "cosine"), torch.zeros(2, 5), atol=1e-6)
    assert (sra.token_distance(scaled, target, "l2") > 0).all()
    # Closed forms for one token.
    a, b = torch.tensor([[[0.0, 0.01, 1.0]]]), torch.zeros(1, 1, 3)
    beta = sra.SMOOTH_L1_BETA
    expected = (0.0 + 0.5 * 0.01**2 / beta + (1.0 - 0.5 * beta)) / 3
    assert sra.token_distance(a, b, "smooth_l1").item() == pytest.approx(expected, rel=1e-6)
    assert sra.token_distance(a, b, "l1").item() == pytest.approx(1.01 / 3, rel=1e-6)
    assert sra.token_distance(a, b, "l2").item() == pytest.approx((0.01**2 + 1) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="alignment distance"):
        sra.SRAConfig(1, 2, 0.2, distance="cos")


def test_ema_update_math():
    backbone = tiny_model()
    ema = sra.EMATeacher(backbone, decay=0.75)
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
    assert sra.align_weight(10**6) == sra.ALIGN_WEIGHT
    spe = 100
    assert sra.align_weight(149 * spe, "release", 0.2, spe) == 0.2
    assert sra.align_weight(1149 * spe, "release", 0.2, spe) == pytest.approx(0.02)
    assert sra.align_weight(649 * spe + 99, "release", 0.2, spe) == pytest.approx(0.2 * 0.1**0.5)


def test_sra_off_is_the_plain_objective():
    backbone = tiny_model(class_dropout_prob=0.1)
    objective = create_objective("flow")
    loss_fn = sra.TrainingLoss(objective, 0.1, 10, sra=None)
    x0, y = batch()
    torch.manual_seed(3)
    terms = loss_fn(sra.Student(backbone), None, x0, y, weight=0.2)
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
