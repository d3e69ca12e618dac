"""PCA pictures of token features (the paper's Figure 2, left): the first three principal components
of one image's tokens at one (block, noise level), each scaled to [0, 1], shown as RGB on the token
grid. The PCA is fitted per image, so each picture shows that image's own dominant structure."""
import torch
from torch import Tensor

from analysis.features import FeatureModel, token_features

RGB_COMPONENTS = 3


def principal_components(tokens: Tensor, count: int = RGB_COMPONENTS) -> Tensor:
    """Projections (T, count) of tokens (T, D) on their first `count` principal directions, in float64.
    The sign of a direction is fixed so that its largest-magnitude projection is positive (an SVD's
    signs are arbitrary; this makes the picture deterministic)."""
    if tokens.ndim != 2 or min(tokens.shape) < count:
        raise ValueError(f"PCA to {count} components needs (T, D) tokens with T, D >= {count}, "
                         f"got {tuple(tokens.shape)}")
    centered = tokens.double() - tokens.double().mean(dim=0)
    _, _, directions = torch.linalg.svd(centered, full_matrices=False)  # rows: directions by variance
    projections = centered @ directions[:count].T  # (T, count)
    largest = projections.gather(0, projections.abs().argmax(dim=0, keepdim=True))  # (1, count)
    return projections * torch.where(largest < 0, -1.0, 1.0)


def to_unit_range(values: Tensor) -> Tensor:
    """Min-max scale each column of (T, K) to [0, 1]; a constant column becomes 0."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    return (values - low) / torch.where(high > low, high - low, torch.ones_like(high))


def token_pca_rgb(tokens: Tensor, grid: int) -> Tensor:
    """Tokens (N, T, D) with T = grid² in row-major patch order -> pictures (N, grid, grid, 3) float32
    in [0, 1]."""
    if tokens.shape[1] != grid * grid:
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {grid}×{grid} grid")
    pictures = [to_unit_range(principal_components(image_tokens)) for image_tokens in tokens.cpu()]
    return torch.stack(pictures).reshape(len(tokens), grid, grid, RGB_COMPONENTS).float()


@torch.no_grad()
def pca_panels(feature_model: FeatureModel, x0: Tensor, eps: Tensor, blocks, noise_levels) -> Tensor:
    """PCA pictures (I, len(noise_levels), len(blocks), grid, grid, 3) of images x0 (I, C, H, W) noised
    with eps, on the model's device; one forward pass per noise level."""
    model = feature_model.model
    grid = model.input_size // model.patch_size
    device = feature_model.device
    rows = []
    for noise_level in noise_levels:
        x_t, t_model = feature_model.inputs(x0.to(device), eps.to(device), noise_level)
        tokens = token_features(model, x_t, t_model, blocks)
        rows.append(torch.stack([token_pca_rgb(tokens[block], grid) for block in blocks], dim=1))
    return torch.stack(rows, dim=1)


def input_pictures(x0: Tensor, kind: str) -> Tensor:
    """What the model saw, as (I, H, W, 3) in [0, 1]: the pixels for pixel data ([-1, 1] -> [0, 1]),
    the first three latent channels, each min-max scaled per image, for VAE data."""
    channels = x0[:, :RGB_COMPONENTS].permute(0, 2, 3, 1).float().cpu()  # (I, H, W, 3)
    if kind == "pixels":
        return ((channels + 1) / 2).clamp(0, 1)
    flat = channels.reshape(len(channels), -1, RGB_COMPONENTS)
    return torch.stack([to_unit_range(image) for image in flat]).reshape(channels.shape)
