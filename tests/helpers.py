"""Small shared test utilities (tiny models with non-trivial weights)."""
from pathlib import Path

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


class RunsCode:
    """A pickled payload: unpickling it runs `command` in a shell (os.system), or `source` through
    Python's exec where given. Loading a file that holds one must refuse it, never run it."""

    def __init__(self, command=None, source=None):
        self.command, self.source = command, source

    def __reduce__(self):
        import os

        return (exec, (self.source,)) if self.source is not None else (os.system, (self.command,))


def release_with_payload(path, state_dict, payload):
    """A release-shaped training file (model/ema/opt/args/steps) whose `args` is `payload`."""
    torch.save({"model": state_dict, "ema": state_dict, "opt": {}, "args": payload, "steps": 10}, path)
    return path


def write_class_images(folder, classes=4, per_class=8, size=8, seed=0):
    """An image folder of `classes` subfolders of `per_class` PNGs, each class a darker-to-lighter colour
    band, for datasets made with `python -m preprocessing --vae none`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(classes):
        class_folder = folder / f"class_{label}"
        class_folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 64, (size, size, 3)) + 48 * label
            Image.fromarray(pixels.astype(np.uint8)).save(class_folder / f"{index}.png")
    return folder


# A 2-level AutoencoderKL config that downsamples by 2 ** (2 - 1) = 2: 16 px images -> 8x8 latents.
TINY_VAE = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
}


def tiny_vae_dir(root: Path) -> Path:
    """A 2-level AutoencoderKL with random weights: 4 latent channels, downsample 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    path = root / "tiny-vae"
    vae.save_pretrained(path)
    return path
