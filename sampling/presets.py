"""Sampling settings: defaults, and presets that reproduce the papers' FID-50K evaluations.

A preset is a partial set of settings; `resolve` fills the rest from DEFAULTS and lets every flag
that was given override it. `None` means "the objective's own default" (sampler and steps).
"""
from errors import UserError

FID_NUM_SAMPLES = 50_000  # FID-50K, the protocol of the ADM, DiT, SiT and SRA tables (SPEC §5)
MSCOCO_NUM_SAMPLES = 30_000  # FID-30K on MS-COCO val captions (U-ViT's text-to-image protocol)

DEFAULTS = {
    "sampler": None,  # DiT: ddpm; SiT: sde (the objective's default_method)
    "num_steps": None,  # 250 for both (the objective's default_num_steps, SPEC §5)
    "ddim_eta": 0.0,  # deterministic DDIM
    "cfg_scale": 1.0,  # no guidance
    "guidance_interval": (0.0, 1.0),  # guide at every step
    "cfg_channels": "all",  # SPEC §5: all latent channels; "3" is the DiT/SiT release's choice
    "rounding": "nearest",  # DiT's clamp(127.5·x + 128)
    "num_samples": FID_NUM_SAMPLES,
}

# Each preset names the family it is meant for; using it with the other family is an error.
PRESETS = {
    # SRA paper, SiT-XL/2 + SRA at 256 px: FID 1.58 (SPEC §4, §5); rounding of the SRA release.
    "sit-xl2-sra-256-cfg": {
        "family": "SiT", "sampler": "sde", "num_steps": 250, "cfg_scale": 1.8,
        "guidance_interval": (0.0, 0.7), "cfg_channels": "all", "rounding": "floor",
    },
    # The same without guidance ("w/o CFG" rows of the SRA tables).
    "sit-xl2-sra-256": {
        "family": "SiT", "sampler": "sde", "num_steps": 250, "cfg_scale": 1.0, "rounding": "floor",
    },
    # SiT paper (SiT release sample_ddp.py): SDE 250 steps, CFG 1.5 on the first 3 channels.
    "sit-xl2-256-cfg": {
        "family": "SiT", "sampler": "sde", "num_steps": 250, "cfg_scale": 1.5, "cfg_channels": "3",
        "rounding": "nearest",
    },
    # DiT paper (DiT release sample_ddp.py): 250 DDPM steps, CFG 1.5 on the first 3 channels.
    "dit-xl2-256-cfg": {
        "family": "DiT", "sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.5, "cfg_channels": "3",
        "rounding": "nearest",
    },
    "dit-xl2-256": {
        "family": "DiT", "sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.0, "rounding": "nearest",
    },
    # DiT-XL/2 + SRA (the SRA release's DiT-SRA/gen.sh: DDPM 250 steps, no CFG; its generate.py truncates
    # clamp(255·x) to uint8, "floor"). The paper plots DiT + SRA without guidance.
    "dit-xl2-sra-256": {
        "family": "DiT", "sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.0, "rounding": "floor",
    },
    # SRA paper's text-to-image table (SPEC §8): ODE, 50 steps (Euler, REPA's generate_t2i.py --mode ode);
    # CFG 1.5 on every step with the empty caption (that script's defaults); clamp-and-truncate rounding
    # (its clamp(255·x) to uint8). 30K samples: MS-COCO's FID-30K (U-ViT's protocol); REPA's script
    # draws 40,192, one per val image — pass --num-samples for that.
    "mmdit-coco-ode50": {
        "family": "MMDiT", "sampler": "euler", "num_steps": 50, "cfg_scale": 1.5, "guidance_interval": (0.0, 1.0),
        "rounding": "floor", "num_samples": MSCOCO_NUM_SAMPLES,
    },
}
PRESET_NAMES = tuple(PRESETS)


def resolve(preset: str | None, overrides: dict) -> dict:
    """DEFAULTS <- PRESETS[preset] <- the overrides that are not None. Adds `family` (None: any)."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    settings = {**DEFAULTS, "family": None, **(PRESETS[preset] if preset else {})}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings
