"""Self-Representation Alignment (SPEC §3) as a guidance method: its config and target (`method.py`),
the projection head, the teacher's interval and the per-model block pairs.

Older names stay importable from here: `sra.EMATeacher` (now `training.ema.EMA`), `sra.Student`,
`sra.TrainingLoss`, `sra.token_distance`, `sra.align_weight` (now in `guidance`).
"""
from guidance.base import WEIGHT_SCHEDULES, align_weight
from guidance.distances import DISTANCES, SMOOTH_L1_BETA, token_distance
from guidance.loss import Student, TrainingLoss
from training.ema import EMA as EMATeacher
from training.ema import EMA_DECAY

from .defaults import BLOCK_PAIRS, T_MAX, default_block_pair
from .head import ProjectionHead
from .interval import INTERVALS, draw_delta
from .method import ALIGN_WEIGHT, SRA, SRAConfig

__all__ = [
    "ALIGN_WEIGHT",
    "BLOCK_PAIRS",
    "DISTANCES",
    "EMA_DECAY",
    "EMATeacher",
    "INTERVALS",
    "ProjectionHead",
    "SMOOTH_L1_BETA",
    "SRA",
    "SRAConfig",
    "Student",
    "T_MAX",
    "TrainingLoss",
    "WEIGHT_SCHEDULES",
    "align_weight",
    "default_block_pair",
    "draw_delta",
    "token_distance",
]
