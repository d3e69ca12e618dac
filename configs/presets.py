"""Training presets: the paper's runs (SPEC §4) and small ones for debugging and the demo.

A preset is a partial config; `train.py` fills the rest from DEFAULTS and lets every CLI flag override.
Values that are None are derived from the model at start-up (the SRA block pair, SPEC §3 table).
"""
from sra import ALIGN_WEIGHT, EMA_DECAY, SMOOTH_L1_BETA, T_MAX

STEPS_400K = 400_000  # the paper's ablation length (§4, Table 3.2)
STEPS_800_EPOCHS = 4_000_000  # 800 ImageNet epochs at batch 256 ≈ 1,281,167·800/256 (SiT-XL/2 + SRA, 1.58 FID)

DEFAULTS = {
    # data and run
    "data_dir": None,
    "results_dir": "results",
    "run_name": None,  # default: the preset name (or the model name)
    "seed": 0,
    # model
    "model": "SiT-B/2",
    "class_dropout_prob": 0.1,  # SPEC §1
    "qk_norm": False,
    "learn_sigma": None,  # family default: DiT True, SiT False
    # objective (SPEC §2)
    "path": "linear",
    "prediction": "velocity",
    "time_sampling": "uniform",
    "dit_teacher_min_step": 0,  # the paper truncates t − Δ at 0; the DiT release clamps at 1
    # SRA (SPEC §3)
    "sra": "on",
    "student_depth": None,
    "teacher_depth": None,
    "t_max": T_MAX,
    "interval": "dynamic",
    "align_distance": "smooth_l1",
    "smooth_l1_beta": SMOOTH_L1_BETA,
    "align_weight": ALIGN_WEIGHT,
    "align_weight_schedule": "constant",
    "align_decay_start_epoch": 149,  # release schedule (SPEC §3 step 7)
    "align_decay_epochs": 1000,
    "ema_decay": EMA_DECAY,
    # optimization (SPEC §4)
    "max_steps": STEPS_400K,
    "global_batch_size": 256,
    "grad_accum_steps": 1,
    "lr": 1e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "mixed_precision": "bf16",
    "tf32": True,
    "compile": False,
    "max_nonfinite_steps": 100,  # consecutive skipped steps before the run stops
    # data loading
    "num_workers": 4,
    # logging and checkpoints
    "log_every": 100,
    "ckpt_every": 10_000,
    "keep_last": 2,
    "milestone_every": 100_000,
    "sample_every": 10_000,
    "sample_grid_size": 16,
    "sample_steps": 50,
    "vae": None,  # decoder for sample grids; default: the dataset's VAE
    "eval_every": 0,  # FID-K of the EMA every N steps (0: never)
    "eval_ref": None,  # reference statistics (.npz with mu, sigma, mu_s, sigma_s)
    "eval_samples": 10_000,  # K
    "eval_batch_size": 125,  # per process
    "eval_steps": 50,  # sampling steps of the FID-K samples (the default sampler, no guidance)
    "wandb": False,
    "tensorboard": True,
}

# (family, size) -> what the paper trains for it
_PAPER_RUNS = {
    "sit-b2": {"model": "SiT-B/2", "max_steps": STEPS_400K},
    "sit-l2": {"model": "SiT-L/2", "max_steps": STEPS_400K},
    "sit-xl2": {"model": "SiT-XL/2", "max_steps": STEPS_800_EPOCHS},
    "dit-b2": {"model": "DiT-B/2", "max_steps": STEPS_400K},
    "dit-l2": {"model": "DiT-L/2", "max_steps": STEPS_400K},
    "dit-xl2": {"model": "DiT-XL/2", "max_steps": STEPS_800_EPOCHS},
    "sit-xl2-512": {"model": "SiT-XL/2", "max_steps": STEPS_800_EPOCHS},
}

PRESETS = {}
for _name, _run in _PAPER_RUNS.items():
    PRESETS[_name] = {**_run, "sra": "off"}
    PRESETS[f"{_name}-sra"] = {**_run, "sra": "on"}
for _name in ("sit-xl2-512", "sit-xl2-512-sra"):
    # the release's λ decay at 512 px starts at epoch 99 and spans 800 epochs (SPEC §3 step 7)
    PRESETS[_name].update(align_decay_start_epoch=99, align_decay_epochs=800)

PRESETS["debug"] = {
    "model": "SiT-T/2",
    "max_steps": 20,
    "global_batch_size": 8,
    "mixed_precision": "no",
    "num_workers": 0,
    "log_every": 5,
    "ckpt_every": 10,
    "milestone_every": 0,
    "sample_every": 20,
    "sample_grid_size": 4,
    "sample_steps": 4,
    "ema_decay": 0.99,  # a short run's EMA must move to be worth sampling
}
PRESETS["demo"] = {
    # `make demo` (demo/): 16×16 pixel shapes on 2 CPU cores, baseline and SRA a few minutes each.
    # SiT-T/4 at 16 px is 16 tokens, ~0.2 s a step there; SiT-T/2 at 32 px would be 256 tokens, >16× the cost.
    "model": "SiT-T/4",
    "max_steps": 500,
    "global_batch_size": 64,
    "mixed_precision": "no",
    "num_workers": 0,  # the pixels are memory-mapped; worker processes would only take CPU from the step
    "lr": 1e-3,  # measured over 600 steps (SiT-T/8, 32 px): loss 0.28 and visible blobs, 3e-4 gave 0.37
    "ema_decay": 0.99,  # horizon 1/(1-m) = 100 steps, 1/5 of the run (the paper's 0.9999 is 1/40 of 400K)
    "log_every": 25,
    "ckpt_every": 100,
    "milestone_every": 0,
    "sample_every": 250,
    "sample_steps": 32,
    "eval_samples": 150,  # Inception runs at ~6 images/s on 2 cores: FID-150 is what the time allows
    "eval_batch_size": 50,
    "eval_steps": 32,  # the same SDE steps as the demo's sample_ddp.py samples, so FIDs compare
    "tensorboard": False,
}
PRESET_NAMES = tuple(PRESETS)


def resolve(preset=None, overrides=None):
    """DEFAULTS ← preset ← overrides (None values in overrides mean 'not given')."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    config = {**DEFAULTS, **(PRESETS[preset] if preset else {})}
    unknown = set(overrides or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config.update({key: value for key, value in (overrides or {}).items() if value is not None})
    config["preset"] = preset
    return config
