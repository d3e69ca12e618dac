"""Training presets: the paper's runs (SPEC §4), REPA's for comparison (SPEC §7), and small ones for
debugging and the demo.

A preset is a partial config keyed by flag name (`t_max` is `--t-max`); `configs.cli.resolve` fills
the rest from the dataclass defaults (configs/schema.py and each guidance method's config) and lets
every flag given on the command line override it. Per-model settings that a preset leaves out (the
block pair, REPA's depth) come from their tables at start-up.
"""
STEPS_400K = 400_000  # the paper's ablation length (§4, Table 3.2); REPA's 400K-iteration tables
STEPS_800_EPOCHS = 4_000_000  # 800 ImageNet epochs at batch 256 ≈ 1,281,167·800/256 (SiT-XL/2 + SRA, 1.58 FID)
STEPS_150K = 150_000  # the SRA paper's text-to-image table: MMDiT on MS-COCO after 150K iterations (§3.3)

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
    PRESETS[_name] = {**_run, "guidance": "none"}
    PRESETS[f"{_name}-sra"] = {**_run, "guidance": "sra"}
# the release's λ decay at 512 px starts at epoch 99 and spans 800 epochs (SPEC §3 step 7)
PRESETS["sit-xl2-512-sra"].update(align_decay_start_epoch=99, align_decay_epochs=800)
# REPA with its published settings (SPEC §7; the repository's README scripts): DINOv2 ViT-B/14 on the
# clean image, projector to 2048, −cos per token, λ 0.5; alignment depth 8 for SiT-XL/2 and 4 for
# SiT-B/2 (repa/method.py). SiT-XL/2 + REPA trains 4M iterations (800 epochs, FID 1.42 with CFG).
PRESETS["sit-b2-repa"] = {**_PAPER_RUNS["sit-b2"], "guidance": "repa"}
PRESETS["sit-l2-repa"] = {**_PAPER_RUNS["sit-l2"], "guidance": "repa"}
PRESETS["sit-xl2-repa"] = {**_PAPER_RUNS["sit-xl2"], "guidance": "repa"}
# The SRA authors' newest setting (SiT-SRA_DTS_AS/scripts/train.sh; SPEC §7): SRA with dual-time
# scheduling and attention separation on SiT-B/2 — tokens in groups of 1/4 and 3/4, each group at its
# own time, attending only within the group; the teacher at each group's t − Δ (Δ ~ U(0, 0.2)) behind
# the same groups; block pair 3 → 8, 1 − cos, λ 0.5, fp16, batch 256, lr 1e-4 (the last two are the
# defaults). The release runs up to 4.1M steps; the preset keeps the 400K ablation length.
PRESETS["sit-b2-sra-dts-as"] = {
    **_PAPER_RUNS["sit-b2"], "guidance": "sra",
    "mask_ratio": (0.25,), "dual_time_scheduling": True, "attention_separation": True,
    "teacher_t": "sra", "teacher_mask": True,
    "student_depth": 3, "teacher_depth": 8, "align_distance": "cosine", "align_weight": 0.5,
    "mixed_precision": "fp16",
}
# The ablations that need their own switch (SPEC §6): SiT-B/2 + SRA, 400K steps, one setting changed.
PRESETS["sit-b2-sra-no-head"] = {**PRESETS["sit-b2-sra"], "projection_head": False}  # Table 3.2, PH. off
PRESETS["sit-b2-sra-teacher-ssl"] = {**PRESETS["sit-b2-sra"], "teacher_update": "ssl_cosine"}  # Appendix F
PRESETS["sit-b2-sra-teacher-copy"] = {**PRESETS["sit-b2-sra"], "teacher_update": "copy"}  # Appendix F

# Text to image (SPEC §8; the paper's §3.3, following REPA's train_t2i.py): MMDiT-D24/2 (REPA's depth 24, width
# 768) on MS-COCO 2014 256 px latents with CLIP ViT-L/14 contexts (`python -m preprocessing --captions …`);
# linear path, velocity, uniform t, caption dropout 0.1 to the empty caption, batch 256, lr 1e-4: the
# defaults. 150K iterations, the paper's table. SRA "without any hyperparameter tuning": SRA's defaults
# (λ 0.2, smooth-L1, Δ ~ U(0, 0.2), EMA teacher 0.9999) and the block pair of the ¼ / ¾ rule, 6 → 18 of 24
# blocks (sra/defaults.py). REPA with its train_t2i.py settings: DINOv2 ViT-B/14, depth 8, λ 0.5 (its data
# needs the clean images: preprocess with --keep-images).
PRESETS["mmdit-coco"] = {"model": "MMDiT-D24/2", "max_steps": STEPS_150K, "guidance": "none"}
PRESETS["mmdit-coco-sra"] = {**PRESETS["mmdit-coco"], "guidance": "sra"}
PRESETS["mmdit-coco-repa"] = {**PRESETS["mmdit-coco"], "guidance": "repa"}

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
    # Steps, batch and lr: the shapes' recognizability (the share of 500 baseline samples a brightness-only
    # classifier assigns to their class, demo/classifier.py; chance 10%), measured on 2 cores at the same
    # data and seed (BENCHMARKS.md, "The demo's training setting"): 500 steps of 64 at lr 1e-3 30.0% (99 s),
    # 1000 of 32 at 1e-3 36.6%, at 2e-3 47.4%, at 3e-3 52.0% (107 s), at 5e-3 51.6%; 2000 of 16 at 1e-3 49.6%
    # (154 s); SiT-T/2 (64 tokens) 500 of 64 at 1e-3 37.2% (371 s).
    "max_steps": 1000,
    "global_batch_size": 32,
    "mixed_precision": "no",
    "num_workers": 0,  # the pixels are memory-mapped; worker processes would only take CPU from the step
    "lr": 3e-3,
    "ema_decay": 0.99,  # horizon 1/(1-m) = 100 steps, 1/10 of the run (the paper's 0.9999 is 1/40 of 400K)
    "log_every": 50,
    "ckpt_every": 200,
    "milestone_every": 0,
    "sample_every": 500,
    "sample_steps": 32,
    "eval_samples": 150,  # Inception runs at ~6 images/s on 2 cores: FID-150 is what the time allows
    "eval_batch_size": 50,
    "eval_steps": 32,  # the same SDE steps as the demo's sample_ddp.py samples, so FIDs compare
    "tensorboard": False,
}
PRESET_NAMES = tuple(PRESETS)
