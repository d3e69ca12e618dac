"""Backbones: one transformer for DiT and SiT, its registry, checkpoint loading and CFG."""
from .checkpoint import (
    CHECKPOINT_FORMAT,
    DATA_AT_0,
    DATA_AT_1,
    DISCRETE_STEPS,
    LoadedModel,
    checkpoint_metadata,
    load_backbone_state,
    load_checkpoint,
)
from .guidance import RELEASE_DIT_GUIDED_CHANNELS, cfg_forward, guided_model_fn
from .registry import MODEL_NAMES, SIZES, create_model, model_family, parse_model_name
from .transformer import DiT, drop_labels

__all__ = [
    "CHECKPOINT_FORMAT",
    "DATA_AT_0",
    "DATA_AT_1",
    "DISCRETE_STEPS",
    "DiT",
    "LoadedModel",
    "MODEL_NAMES",
    "RELEASE_DIT_GUIDED_CHANNELS",
    "SIZES",
    "cfg_forward",
    "checkpoint_metadata",
    "create_model",
    "drop_labels",
    "guided_model_fn",
    "load_backbone_state",
    "load_checkpoint",
    "model_family",
    "parse_model_name",
]
