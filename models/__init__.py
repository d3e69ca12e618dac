"""Backbones: one transformer for DiT and SiT, its registry, checkpoint loading and CFG."""
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_V1,
    CHECKPOINT_FORMATS,
    LoadedModel,
    checkpoint_metadata,
    load_backbone_state,
    load_checkpoint,
)
from .guidance import RELEASE_DIT_GUIDED_CHANNELS, cfg_forward, guided_model_fn
from .registry import (
    DATA_AT_0,
    DATA_AT_1,
    DISCRETE_STEPS,
    FAMILIES,
    MODEL_NAMES,
    SIZES,
    TIME_CONVENTIONS,
    Family,
    create_model,
    family_of,
    model_family,
    parse_model_name,
)
from .transformer import DiT, drop_labels

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMATS",
    "CHECKPOINT_FORMAT_V1",
    "DATA_AT_0",
    "DATA_AT_1",
    "DISCRETE_STEPS",
    "DiT",
    "FAMILIES",
    "Family",
    "LoadedModel",
    "MODEL_NAMES",
    "RELEASE_DIT_GUIDED_CHANNELS",
    "SIZES",
    "TIME_CONVENTIONS",
    "cfg_forward",
    "checkpoint_metadata",
    "create_model",
    "drop_labels",
    "family_of",
    "guided_model_fn",
    "load_backbone_state",
    "load_checkpoint",
    "model_family",
    "parse_model_name",
]
