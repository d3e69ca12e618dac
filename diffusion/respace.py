"""Respacing: a diffusion over a subset of the original steps, for sampling with fewer steps."""

import torch

from diffusion.gaussian import GaussianDiffusion

DDIM_PREFIX = "ddim"  # "ddimN": N steps at a constant integer stride, as Improved DDPM's space_timesteps


def space_timesteps(num_timesteps: int, spacing: int | str) -> list[int]:
    """The original steps to keep, sorted.

    spacing: an int N or "N" keeps N steps evenly spaced from 0 to T-1 (rounded fractional stride);
    "N1,N2,..." splits [0, T) into equal sections and keeps Ni evenly spaced steps of section i;
    "ddimN" keeps range(0, T, stride) for the integer stride that gives exactly N steps.
    (Improved DDPM's space_timesteps, which DiT uses: "250" for its 250-step sampling.)
    """
    if isinstance(spacing, bool) or not isinstance(spacing, int | str):
        raise ValueError(f"spacing must be an int or a string like '250' or 'ddim50', got {spacing!r}")
    if isinstance(spacing, str) and spacing.startswith(DDIM_PREFIX):
        count = _parse_count(spacing[len(DDIM_PREFIX):], spacing)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} steps ({spacing!r})")
    counts = [spacing] if isinstance(spacing, int) else [_parse_count(c, spacing) for c in spacing.split(",")]
    section_size, remainder = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = section_size + (1 if i < remainder else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} steps of a section of {size} (spacing {spacing!r}, "
                             f"{num_timesteps} steps)")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return kept


def _parse_count(text: str, spacing: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"bad spacing {spacing!r}: expected 'N', 'N1,N2,...' or 'ddimN'")
    return int(text)


def respace(diffusion: GaussianDiffusion, kept_steps: list[int]) -> GaussianDiffusion:
    """A diffusion whose index i is original step kept_steps[i], with betas chosen so that its ᾱ_i
    equals the original ᾱ at that step: β_i = 1 - ᾱ[kept_i] / ᾱ[kept_{i-1}]."""
    kept = torch.tensor(sorted(set(kept_steps)), dtype=torch.long)
    if len(kept) < 2 or kept[0] < 0 or kept[-1] >= diffusion.num_timesteps:
        raise ValueError(f"kept steps must be at least 2 distinct steps in [0, {diffusion.num_timesteps})")
    alphas_cumprod = diffusion.alphas_cumprod.values[kept]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return GaussianDiffusion(1.0 - alphas_cumprod / previous, diffusion.learn_sigma,
                             timestep_map=diffusion.timestep_map[kept],
                             original_num_timesteps=diffusion.original_num_timesteps)
