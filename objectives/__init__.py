"""The generative objective interface, shared by DDPM (diffusion/) and flow matching (transport/).

Those packages implement it; `objectives.registry` maps a name ("ddpm", "flow") or a model family
to an implementation. The interface knows nothing of representation guidance.
"""
from .interface import ModelFn, Objective, SamplerGenerator, standard_normal

__all__ = ["ModelFn", "Objective", "SamplerGenerator", "standard_normal"]
