"""REPA (SPEC §7) as a guidance method: a frozen pretrained encoder on the clean image, REPA's projector
and its negative-cosine loss."""
from .encoder import DEFAULT_ENCODER, ENCODERS, ImageEncoder, load_encoder, weights_sha256
from .method import PROJ_COEFF, PROJECTOR_DIM, REPA, REPAConfig, build_projector

__all__ = [
    "DEFAULT_ENCODER",
    "ENCODERS",
    "PROJECTOR_DIM",
    "PROJ_COEFF",
    "REPA",
    "REPAConfig",
    "ImageEncoder",
    "build_projector",
    "load_encoder",
    "weights_sha256",
]
