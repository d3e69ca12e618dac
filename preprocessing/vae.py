"""The Stable Diffusion VAE: loading, its latent scaling constants, and encoding to posterior moments."""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import UserError
from preprocessing.image import pixels_to_unit_range


@dataclass(frozen=True)
class LatentScaling:
    """Model input = (z - shift) * scale, z a VAE latent; decoding inverts it before the VAE decoder."""

    scale: float
    shift: float
    source: str


SD_VAE_SCALING = LatentScaling(
    scale=0.18215, shift=0.0, source="SPEC §4; Stable Diffusion v1 release, as in the DiT and SiT releases"
)
# Known hub ids. Any other VAE (a local directory) uses `scaling_factor` / `shift_factor` of its config.
VAE_SCALE_FACTORS: dict[str, LatentScaling] = {
    "stabilityai/sd-vae-ft-ema": SD_VAE_SCALING,
    "stabilityai/sd-vae-ft-mse": SD_VAE_SCALING,
}


HUB_ID_PATTERN = r"[\w][\w.-]*/[\w.-]+"  # Hugging Face hub repo ids: owner/name


@dataclass(frozen=True)
class Vae:
    model: torch.nn.Module  # diffusers AutoencoderKL
    name: str  # hub id, or the absolute path of a local directory
    downsample: int  # pixels per latent pixel along each side
    latent_channels: int
    scaling: LatentScaling
    weights_sha256: str  # models.weights_sha256 of the state dict as loaded: the VAE by content


def latent_scaling(name: str, config) -> LatentScaling:
    if name in VAE_SCALE_FACTORS:
        return VAE_SCALE_FACTORS[name]
    shift = config.shift_factor if config.shift_factor is not None else 0.0
    return LatentScaling(config.scaling_factor, shift, f"scaling_factor / shift_factor in {name}/config.json")


def vae_id(name: str) -> str:
    """A hub id as given; a local directory as its absolute path (recorded in the dataset metadata)."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def load_vae(name: str, device: torch.device) -> Vae:
    """`AutoencoderKL.from_pretrained(name)`, or UserError saying why it cannot be loaded."""
    from diffusers import AutoencoderKL  # imported here: the pixel-space path does not need diffusers

    name = vae_id(name)
    if not Path(name).exists() and not re.fullmatch(HUB_ID_PATTERN, name):
        raise UserError(f"the VAE --vae {name} is neither a local directory nor a hub id (owner/name)")
    try:
        model = AutoencoderKL.from_pretrained(name)
    except (OSError, ValueError) as error:
        where = (
            "local directory" if Path(name).exists() else "hub id (there is no local directory of that name)"
        )
        raise UserError(f"cannot load the VAE --vae {name} as a {where}: {error}") from error
    import models  # the one definition of weights by content, shared with checkpoints and the text encoder

    weights_sha256 = models.weights_sha256(model.state_dict())  # on the CPU, as loaded (float32)
    model = model.to(device).eval().requires_grad_(False)
    config = model.config
    # Each encoder block but the last halves the resolution (diffusers `Encoder`).
    downsample = 2 ** (len(config.block_out_channels) - 1)
    return Vae(model, name, downsample, config.latent_channels, latent_scaling(name, config), weights_sha256)


@torch.no_grad()
def encode_moments(vae: Vae, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 2C, H/f, W/f) float16: posterior mean, then std, along dim 1.

    Storing the moments rather than one latent lets the trainer draw a fresh latent every step.
    """
    posterior = vae.model.encode(pixels_to_unit_range(pixels)).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).half()
