"""Image folders -> preprocessed datasets (VAE posterior moments or pixels), and the trainer's reader.

`python -m preprocessing --help` for the command; `preprocessing.store` documents the on-disk format.
"""

from preprocessing.dataset import LatentDataset, ResumableSampler, make_loader, sample_model_input
from preprocessing.vae import SD_VAE_SCALING, VAE_SCALE_FACTORS, LatentScaling

__all__ = [
    "SD_VAE_SCALING",
    "VAE_SCALE_FACTORS",
    "LatentDataset",
    "LatentScaling",
    "ResumableSampler",
    "make_loader",
    "sample_model_input",
]
