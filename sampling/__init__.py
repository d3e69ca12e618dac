"""Sampling for FID: per-index noise and conditions (labels or captions), presets, the checkpoint-to-images
pipeline, and the resumable shard store behind sample_ddp.py."""
from .conditions import CaptionList, CaptionSource, ClassSource, condition_source
from .distributed import barrier, close_distributed, init_distributed, sum_over_processes
from .images import ROUNDINGS, png_name, save_pngs, to_uint8
from .pipeline import (
    DEFAULT_VAE,
    NO_VAE,
    BatchSampler,
    Decoder,
    build_objective,
    check_compatible,
    load_decoder,
    load_model,
    training_info,
)
from .presets import DEFAULTS, FID_NUM_SAMPLES, PRESET_NAMES, PRESETS, resolve
from .seeds import ClassLabels, derived_seed, initial_noise, sampler_generators
from .shards import ShardStore, check_settings, plan_batches, write_settings

__all__ = [
    "DEFAULTS",
    "DEFAULT_VAE",
    "FID_NUM_SAMPLES",
    "NO_VAE",
    "PRESETS",
    "PRESET_NAMES",
    "ROUNDINGS",
    "BatchSampler",
    "CaptionList",
    "CaptionSource",
    "ClassLabels",
    "ClassSource",
    "Decoder",
    "ShardStore",
    "barrier",
    "build_objective",
    "check_compatible",
    "check_settings",
    "training_info",
    "close_distributed",
    "condition_source",
    "derived_seed",
    "init_distributed",
    "initial_noise",
    "load_decoder",
    "load_model",
    "plan_batches",
    "png_name",
    "resolve",
    "sampler_generators",
    "save_pngs",
    "sum_over_processes",
    "to_uint8",
    "write_settings",
]
