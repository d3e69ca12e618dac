"""Small shared test utilities (tiny models with non-trivial weights)."""
import torch

import models


def randomize_(module, seed=0, std=0.02):
    """Overwrite every trainable parameter with seeded noise, so adaLN-Zero layers are not zero and
    outputs depend on every block."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def tiny_model(name="SiT-S/2", seed=0, **options):
    """A 3-block, 32-wide model at 8×8 input, for fast tests."""
    options = {"depth": 3, "hidden_size": 32, "num_heads": 2, **options}
    model = models.create_model(name, input_size=8, in_channels=4, num_classes=10, **options)
    return randomize_(model, seed)


def project_meta(model, name, data_dir=None, vae=None):
    """The `meta` block train.py writes for a backbone of the registered model `name`."""
    from objectives.registry import describe, objective_for_model

    family = models.family_of(name)
    options = {"learn_sigma": model.learn_sigma} if family.objective == "ddpm" else {}
    meta = models.checkpoint_metadata(model, family.time_convention)
    meta.update(objective=describe(objective_for_model(name, **options)), data_dir=data_dir, vae=vae)
    return meta


def tiny_dinov2(seed=0, grid=2):
    """A DINOv2-architecture timm ViT (patch 14, class token, LayerScale) with 2 blocks of width 32 and
    seeded random weights: stands in for the real encoder, which cannot be downloaded here."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=14 * grid,
                            depth=2, embed_dim=32, num_heads=2)
    return randomize_(vit, seed, std=0.2)


def tiny_dinov2_dir(path, seed=0, grid=2):
    """The tiny encoder saved as a timm folder (config.json + model.safetensors), the layout of a
    downloaded `timm/vit_*_dinov2.lvd142m`; load it with `--repa-encoder local-dir:PATH`."""
    from timm.models._hub import save_for_hf

    save_for_hf(tiny_dinov2(seed, grid), path, safe_serialization=True)
    return path
