"""Representation guidance: one interface (`Guidance`, guidance/base.py) for aligning the student's
block-k tokens through a trained head to a target, the training loss written once against it, and
the per-token distances. The methods live beside this package (sra/, repa/); `guidance.registry`
lists them by `--guidance` name.
"""
from .base import (
    WEIGHT_SCHEDULES,
    AlignmentConfig,
    AlignmentInputs,
    Guidance,
    GuidanceContext,
    align_weight,
)
from .distances import DISTANCES, SMOOTH_L1_BETA, token_distance
from .loss import Student, TrainingLoss

__all__ = [
    "DISTANCES",
    "SMOOTH_L1_BETA",
    "WEIGHT_SCHEDULES",
    "AlignmentConfig",
    "AlignmentInputs",
    "Guidance",
    "GuidanceContext",
    "Student",
    "TrainingLoss",
    "align_weight",
    "token_distance",
]
