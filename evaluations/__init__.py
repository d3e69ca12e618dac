"""ADM's evaluation suite (guided-diffusion `evaluations/evaluator.py`) in PyTorch.

In-training FID:

    features = InceptionFeatures.load(device)                  # checks default_1.pt's sha256
    reference = load_reference_statistics("VIRTUAL_imagenet256_labeled.npz")
    pool, _ = features(images_to_uint8(decoded))               # (K, 2048) per batch of samples
    fid = fid_against_reference(all_pool_features, reference)  # FID-K
"""

from .features import Activations, InceptionFeatures, fid_against_reference, images_to_uint8
from .images import (
    ReferenceStatistics,
    load_reference_statistics,
    open_images,
    save_statistics,
    statistics_sha256,
)
from .inception import FIDInceptionV3, load_fid_inception, load_softmax_weight, random_fid_inception
from .metrics import FIDStatistics, frechet_distance, inception_score, precision_recall
from .resize import resize_bilinear_tf1

__all__ = [
    "Activations",
    "FIDInceptionV3",
    "FIDStatistics",
    "InceptionFeatures",
    "ReferenceStatistics",
    "fid_against_reference",
    "frechet_distance",
    "images_to_uint8",
    "inception_score",
    "load_fid_inception",
    "load_reference_statistics",
    "statistics_sha256",
    "load_softmax_weight",
    "open_images",
    "precision_recall",
    "random_fid_inception",
    "resize_bilinear_tf1",
    "save_statistics",
]
