"""Self-Representation Alignment: the loss, the projection head and the EMA teacher (SPEC §3)."""
from .defaults import BLOCK_PAIRS, T_MAX, default_block_pair
from .ema import EMA_DECAY, EMATeacher
from .head import ProjectionHead
from .loss import (
    ALIGN_WEIGHT,
    DISTANCES,
    SMOOTH_L1_BETA,
    WEIGHT_SCHEDULES,
    SRAConfig,
    Student,
    TrainingLoss,
    align_weight,
    token_distance,
)

__all__ = [
    "ALIGN_WEIGHT",
    "BLOCK_PAIRS",
    "DISTANCES",
    "EMA_DECAY",
    "EMATeacher",
    "ProjectionHead",
    "SMOOTH_L1_BETA",
    "SRAConfig",
    "Student",
    "T_MAX",
    "TrainingLoss",
    "WEIGHT_SCHEDULES",
    "align_weight",
    "default_block_pair",
    "token_distance",
]
