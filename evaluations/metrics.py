"""FID, sFID, Inception Score, precision and recall, with the arithmetic of ADM's `evaluator.py`."""

import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

FID_EPS = 1e-6  # ADM: added to both covariance diagonals when sqrtm is not finite
IMAGINARY_ATOL = 1e-3  # ADM: largest imaginary part tolerated on the diagonal of sqrtm
IS_SPLIT_SIZE = 5000  # ADM: contiguous splits of 5,000 samples (10 for 50K)
NEIGHBOURHOOD_SIZE = 3  # ADM / Kynkaanniemi et al. 2019: k = 3 nearest neighbours
DISTANCE_BLOCK_SIZE = 10000  # ADM: row and column batches of the pairwise distances


@dataclass
class FIDStatistics:
    """Mean (float32, as np.mean of float32 features) and covariance (float64, ddof 1) of features."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)

    @classmethod
    def from_features(cls, features):
        features = np.asarray(features)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"statistics need (N >= 2, D) features, got shape {features.shape}")
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False))


def sqrtm_holding_singular_warning(matrix):
    """scipy's sqrtm, and whether it warned (LinAlgWarning) that `matrix` is singular or ill-conditioned;
    that warning is held back, as frechet_distance explains it in its own words."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)  # recorded, whatever filters are set outside
        root = linalg.sqrtm(matrix)
    for warning in caught:  # any other warning is shown as usual
        if not issubclass(warning.category, linalg.LinAlgWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return root, any(issubclass(warning.category, linalg.LinAlgWarning) for warning in caught)


def singular_covariance_note(dim, singular, retried, eps):
    """The one line printed instead of scipy's LinAlgWarning and ADM's retry warning."""
    parts = []
    if singular:
        parts.append(
            f"the covariance product is singular or nearly so: fewer samples than the {dim} feature dimensions make a "
            "covariance singular (and so do features that never vary); expected with few samples"
        )
    if retried:
        parts.append(f"sqrtm was not finite, so {eps} was added to both covariance diagonals, as ADM does")
    return f"note: Frechet distance over {dim} features: " + "; ".join(parts)


def frechet_distance(sample, reference, eps=FID_EPS):
    """||mu_s - mu_r||^2 + tr(S_s) + tr(S_r) - 2 tr(sqrtm(S_s S_r)), as ADM (sample first)."""
    mu1, mu2 = np.atleast_1d(sample.mu), np.atleast_1d(reference.mu)
    sigma1, sigma2 = np.atleast_2d(sample.sigma), np.atleast_2d(reference.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean, singular = sqrtm_holding_singular_warning(sigma1.dot(sigma2))
    retried = not np.isfinite(covmean).all()
    if retried:
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, singular_after_retry = sqrtm_holding_singular_warning((sigma1 + offset).dot(sigma2 + offset))
        singular |= singular_after_retry
    if singular or retried:
        print(singular_covariance_note(len(mu1), singular, retried, eps), file=sys.stderr, flush=True)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probabilities, split_size=IS_SPLIT_SIZE):
    """Mean over contiguous splits of exp(E_x KL(p(y|x) || p(y))); `probabilities` is (N, classes)."""
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start : start + split_size]  # (split, classes)
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def squared_distances(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) in the dtype of u and v. (R, D), (C, D) -> (R, C)."""
    norm_u = u.square().sum(1, keepdim=True)  # (R, 1)
    norm_v = v.square().sum(1)[None]  # (1, C)
    return (norm_u - 2 * (u @ v.T) + norm_v).clamp_min(0)


def pairwise_distances(u, v):
    """ADM's DistanceBlock: squared L2 in float16, redone in float32 if any is not finite; float32 out."""
    distances = squared_distances(u.half(), v.half())
    if torch.isfinite(distances).all():
        return distances.float()
    return squared_distances(u.float(), v.float())


def blocks(length, block_size):
    return [slice(start, min(start + block_size, length)) for start in range(0, length, block_size)]


def manifold_radii(features, k=NEIGHBOURHOOD_SIZE, block_size=DISTANCE_BLOCK_SIZE):
    """Squared distance of each point to its k-th nearest neighbour, itself at rank 0. (N, D) -> (N,)."""
    if len(features) <= k:
        raise ValueError(f"a k = {k} manifold needs more than {k} points, got {len(features)}")
    radii = torch.empty(len(features), device=features.device)
    for rows in blocks(len(features), block_size):
        # the k+1 smallest of each column block hold the k+1 smallest of the whole row
        nearest = [
            pairwise_distances(features[rows], features[columns])
            .topk(min(k + 1, columns.stop - columns.start), dim=1, largest=False)
            .values
            for columns in blocks(len(features), block_size)
        ]
        radii[rows] = torch.cat(nearest, 1).sort(dim=1).values[:, k]
    return radii


def precision_recall(reference, sample, k=NEIGHBOURHOOD_SIZE, block_size=DISTANCE_BLOCK_SIZE):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of (N, D) feature tensors, as ADM.

    Precision: fraction of samples inside the reference manifold (some reference ball contains them).
    Recall: fraction of reference points inside the sample manifold. A point is inside a ball if its
    squared distance is <= the ball's radius.
    """
    reference_radii, sample_radii = (
        manifold_radii(reference, k, block_size),
        manifold_radii(sample, k, block_size),
    )
    reference_covered = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    sample_covered = torch.zeros(len(sample), dtype=torch.bool, device=sample.device)
    for rows in blocks(len(reference), block_size):
        for columns in blocks(len(sample), block_size):
            distances = pairwise_distances(reference[rows], sample[columns])  # (R, C)
            reference_covered[rows] |= (distances <= sample_radii[columns][None]).any(1)
            sample_covered[columns] |= (distances <= reference_radii[rows][:, None]).any(0)
    precision = sample_covered.double().mean().item()
    recall = reference_covered.double().mean().item()
    return precision, recall
