"""Image folders -> preprocessed datasets (VAE posterior moments or pixels), and the trainer's reader.
Class-conditional data take their labels from class subfolders; text-to-image data (--captions) store
each image's captions encoded by a frozen CLIP text encoder (`preprocessing.text`).

`python -m preprocessing --help` for the command; `preprocessing.store` documents the on-disk format.
"""

from preprocessing.captions import read_captions
from preprocessing.dataset import LatentDataset, ResumableSampler, make_loader, sample_model_input
from preprocessing.text import CONTEXT_DTYPE, TextEncoder, load_text_encoder, round_like_stored
from preprocessing.vae import SD_VAE_SCALING, VAE_SCALE_FACTORS, LatentScaling

__all__ = [
    "CONTEXT_DTYPE",
    "SD_VAE_SCALING",
    "VAE_SCALE_FACTORS",
    "LatentDataset",
    "LatentScaling",
    "ResumableSampler",
    "TextEncoder",
    "load_text_encoder",
    "make_loader",
    "read_captions",
    "round_like_stored",
    "sample_model_input",
]
