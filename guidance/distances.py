"""How a projected student token is compared with its target token, over the feature dimension."""
import torch
import torch.nn.functional as F

DISTANCES = ("smooth_l1", "cosine", "neg_cosine", "l2", "l1")
SMOOTH_L1_BETA = 0.05  # SRA paper, Appendix C


def token_distance(pred, target, distance, smooth_l1_beta=SMOOTH_L1_BETA):
    """Distance over the feature dimension for every token: (N, T, D), (N, T, D) -> (N, T).

    Computed in fp32 whatever the autocast dtype. Element-wise distances are averaged over D, so their
    scale does not depend on the width. `cosine` is 1 − cos over D (SRA; the SRA release's code takes
    it over the tokens by mistake, SPEC §3 step 6); `neg_cosine` is −cos of the L2-normalized vectors,
    REPA's loss term exactly (its `loss.py`): the same gradient as `cosine`, offset by 1."""
    pred, target = pred.float(), target.float()
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1)
    if distance == "neg_cosine":
        return -(F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=smooth_l1_beta, reduction="none").mean(dim=-1)
    if distance == "l2":
        return (pred - target).pow(2).mean(dim=-1)
    if distance == "l1":
        return (pred - target).abs().mean(dim=-1)
    raise ValueError(f"alignment distance must be one of {DISTANCES}, got {distance!r}")


def check_same_tokens(projected: torch.Tensor, target: torch.Tensor) -> None:
    if projected.shape != target.shape:
        raise ValueError(f"projected student tokens {tuple(projected.shape)} and target tokens "
                         f"{tuple(target.shape)} must have the same shape (N, T, D)")
