"""Stochastic interpolants (flow matching) for SiT: paths, predictions, samplers, the objective.

Convention (SRA's release, SPEC §2): t = 0 is data, t = 1 is noise. `ReversedTime` runs models of
the original SiT release (t = 1 data) in this convention.
"""

from transport.convention import ReversedTime
from transport.objective import FlowObjective
from transport.paths import PATHS, CosinePath, LinearPath, Path, VPPath, make_path
from transport.predictions import (
    PREDICTIONS,
    noise_to_score,
    noise_to_velocity,
    score_to_noise,
    score_to_velocity,
    to_velocity,
    velocity_to_noise,
    velocity_to_score,
)
from transport.samplers import SDE_LAST_STEP_TIME, ode_sample, sde_diffusion, sde_sample

__all__ = [
    "PATHS",
    "PREDICTIONS",
    "SDE_LAST_STEP_TIME",
    "CosinePath",
    "FlowObjective",
    "LinearPath",
    "Path",
    "ReversedTime",
    "VPPath",
    "make_path",
    "noise_to_score",
    "noise_to_velocity",
    "ode_sample",
    "score_to_noise",
    "score_to_velocity",
    "sde_diffusion",
    "sde_sample",
    "to_velocity",
    "velocity_to_noise",
    "velocity_to_score",
]
