"""REPA as a guidance method: its loss, projector, encoder input and weights, against REPA's own formulas
(sihyun-yu/REPA loss.py, models/sit.py, train.py) written out here."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torchvision.transforms import Normalize

import models
from errors import UserError
from guidance import GuidanceContext, Student, TrainingLoss, token_distance
from models.checkpoint import split_extras
from objectives.registry import create_objective
from repa import REPA, ImageEncoder, REPAConfig, build_projector, load_encoder, weights_sha256
from repa.encoder import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers import tiny_dinov2, tiny_dinov2_dir, tiny_model
from training.ema import EMA

GRID = 4  # tiny_model: 8×8 inputs, patch 2


def repa_projection_loss(zs, zs_tilde):
    """REPA's loss.py, term for term: for each encoder and each sample, the mean over tokens of −cos of
    the normalized vectors; summed, then divided by (encoders × batch)."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss += (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return proj_loss / (len(zs) * bsz)


def repa_parts(seed=0, student_depth=2):
    backbone = tiny_model("SiT-S/2", seed=seed)
    ema = EMA(backbone)
    objective = create_objective("flow")
    config = REPAConfig(student_depth=student_depth)
    method = REPA(config, GuidanceContext(objective, ema.model, backbone, torch.device("cpu")),
                  ImageEncoder(tiny_dinov2(seed=1, grid=GRID), GRID))
    student = Student(backbone, method.build_head(backbone.hidden_size), student_depth)
    return student, method, TrainingLoss(objective, 0.1, backbone.num_classes, method)


def images(n=3, size=16, seed=4):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_neg_cosine_is_repas_projection_loss_on_hand_made_features():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 7, generator=generator)
    z_tilde = torch.randn(3, 5, 7, generator=generator) * 10  # the norm must not matter
    ours = token_distance(z_tilde, z, "neg_cosine").mean()
    torch.testing.assert_close(ours, repa_projection_loss([z], [z_tilde]), rtol=0, atol=1e-7)
    # Closed form: parallel tokens give −1, opposite +1, orthogonal 0.
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[2.0, 0.0], [-3.0, 0.0], [0.0, 5.0]]])
    assert token_distance(a, b, "neg_cosine").tolist() == [[-1.0, 1.0, 0.0]]


def test_training_loss_equals_repas_for_the_same_model_encoder_images_and_noise():
    student, method, loss_fn = repa_parts()
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 2, 3])
    pixels = images()
    torch.manual_seed(11)
    terms = loss_fn(student, x0, y, weight=0.5, images=pixels)
    # REPA's SILoss with v-prediction on the linear path, given the same labels, times and noise.
    torch.manual_seed(11)
    y_dropped = models.drop_labels(y, 0.1, 10)
    t = torch.rand(3)
    noises = torch.randn_like(x0)
    t4 = t.view(-1, 1, 1, 1)
    model_input = (1 - t4) * x0 + t4 * noises
    model_target = -1 * x0 + 1 * noises
    output, tokens = student.backbone.forward_with_features(model_input, t, y_dropped, 2)
    zs_tilde = [student.head(tokens)]
    denoising_loss = ((output - model_target) ** 2).mean(dim=(1, 2, 3))
    with torch.no_grad():
        zs = [method.encoder(pixels)]
    proj_loss = repa_projection_loss(zs, zs_tilde)
    torch.testing.assert_close(terms["gen"], denoising_loss.mean(), rtol=0, atol=1e-7)
    torch.testing.assert_close(terms["align"], proj_loss.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(terms["loss"], denoising_loss.mean() + 0.5 * proj_loss, rtol=0, atol=1e-7)


def test_projector_is_repas_mlp_with_its_key_names_and_init():
    projector = build_projector(32, 2048, 768)
    shapes = {key: tuple(value.shape) for key, value in projector.state_dict().items()}
    assert shapes == {"0.weight": (2048, 32), "0.bias": (2048,), "2.weight": (2048, 2048), "2.bias": (2048,),
                      "4.weight": (768, 2048), "4.bias": (768,)}
    assert [type(layer).__name__ for layer in projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert all(float(layer.bias.detach().abs().max()) == 0 for layer in projector if hasattr(layer, "bias"))
    bound = (6 / (2048 + 2048)) ** 0.5  # Xavier-uniform, as REPA's model initializes every Linear
    assert 0.9 * bound < float(projector[2].weight.detach().abs().max()) <= bound
    # A REPA checkpoint's projectors.0.* group loads into it strictly.
    release = {f"projectors.0.{key}": torch.randn(shape) for key, shape in shapes.items()}
    _, extras = split_extras({**release, "pos_embed": torch.zeros(1)})
    projector.load_state_dict({key[2:]: value for key, value in extras["projectors"].items()}, strict=True)


def test_projector_keeps_pytorchs_init_on_repas_mmdit():
    """REPA's models/mmdit.py initializes no layer, its projectors included (its SiT uses Xavier)."""
    torch.manual_seed(0)
    projector = build_projector(32, 2048, 768, init="default")
    for layer, fan_in in ((projector[0], 32), (projector[2], 2048), (projector[4], 2048)):
        assert 0.95 * fan_in ** -0.5 < float(layer.weight.detach().abs().max()) <= fan_in ** -0.5
        assert float(layer.bias.detach().abs().max()) > 0


def test_encoder_gets_no_gradient_and_stays_frozen():
    student, method, loss_fn = repa_parts()
    x0, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    method.encoder.train()  # a stray .train() must not switch the frozen encoder to training mode
    loss_fn(student, x0, y, weight=0.5, images=images())["loss"].backward()
    assert not method.encoder.training and not method.encoder.vit.training
    assert all(p.grad is None and not p.requires_grad for p in method.encoder.parameters())
    assert all(p.grad is not None for p in student.head.parameters())
    assert student.head[-1].out_features == method.encoder.embed_dim == 32


def test_encoder_input_and_output_are_repas():
    vit = tiny_dinov2(seed=2, grid=GRID)
    encoder = ImageEncoder(vit, GRID)
    pixels = images(size=32)
    # REPA's preprocess_raw_image for DINOv2: /255, ImageNet normalization, bicubic resize to the grid.
    expected = Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixels / 255.0)
    expected = F.interpolate(expected, 14 * GRID, mode="bicubic")
    assert torch.equal(encoder.preprocess(pixels), expected)
    tokens = encoder(pixels)
    assert tokens.shape == (3, GRID * GRID, 32)
    torch.testing.assert_close(tokens, vit.forward_features(expected)[:, 1:], rtol=0, atol=0)  # no class token


def test_encoder_from_a_timm_folder_and_its_weights_digest(tmp_path):
    folder = tiny_dinov2_dir(tmp_path / "tiny", seed=3, grid=GRID)
    encoder = load_encoder(f"local-dir:{folder}", grid=GRID)
    reference = tiny_dinov2(seed=3, grid=GRID)
    assert all(torch.equal(a, b) for a, b in zip(encoder.vit.state_dict().values(), reference.state_dict().values()))
    assert weights_sha256(encoder.vit) == weights_sha256(reference)
    assert weights_sha256(encoder.vit) != weights_sha256(tiny_dinov2(seed=4, grid=GRID))
    # A model with another token grid gets DINOv2's position embedding resampled as REPA does.
    wider = load_encoder(f"local-dir:{folder}", grid=3)
    expected = resample_abs_pos_embed(reference.pos_embed.data, [3, 3], num_prefix_tokens=1)
    assert torch.equal(wider.vit.pos_embed.data, expected) and wider.input_size == 42


def test_dinov2_torch_hub_checkpoint_file_is_converted(tmp_path):
    """DINOv2's own checkpoints (torch.hub's dinov2_vit*14_pretrain.pth) carry a mask token and a
    37×37 position grid (518 px); they load through --repa-encoder-weights."""
    source = tiny_dinov2(seed=5, grid=37)
    state = {**source.state_dict(), "mask_token": torch.zeros(1, 32)}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    folder = tiny_dinov2_dir(tmp_path / "arch", grid=GRID)  # the architecture; its weights are replaced
    encoder = load_encoder(f"local-dir:{folder}", weights=str(path), grid=GRID)
    expected = resample_abs_pos_embed(source.pos_embed.data, [GRID, GRID], num_prefix_tokens=1)
    assert torch.equal(encoder.vit.pos_embed.data, expected)
    assert torch.equal(encoder.vit.blocks[1].ls2.gamma, source.blocks[1].ls2.gamma)


def test_encoder_mistakes_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such file"):
        load_encoder("dinov2-vit-s", weights=str(tmp_path / "missing.pth"), grid=GRID)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read it"):
        load_encoder("dinov2-vit-s", weights=str(garbage), grid=GRID)
    with pytest.raises(UserError, match="not a timm ViT"):
        load_encoder("no-such-model", grid=GRID)

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return original(*args, **kwargs)

    import timm

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="offline, pass a local folder"):
        load_encoder("dinov2-vit-b", grid=GRID)


def test_default_depths_follow_repa():
    assert REPAConfig().resolved_for("SiT-XL/2", 28).student_depth == 8  # REPA's scripts
    assert REPAConfig().resolved_for("SiT-L/2", 24).student_depth == 8
    assert REPAConfig().resolved_for("SiT-B/2", 12).student_depth == 4
    assert REPAConfig().resolved_for("SiT-T/2", 6).student_depth == 2  # a third of the depth
    with pytest.raises(UserError, match="--student-depth 7 is outside SiT-T/2's blocks 1..6"):
        REPAConfig(student_depth=7).resolved_for("SiT-T/2", 6)


def test_missing_images_are_named():
    student, method, loss_fn = repa_parts()
    with pytest.raises(UserError, match="--keep-images"):
        loss_fn(student, torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]), weight=0.5)
