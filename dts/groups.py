"""Drawing token groups and their times for a batch (the release's `SiT-SRA_DTS_AS/loss.py`).

Per image: a random assignment of the T tokens to G groups of fixed sizes (the sizes follow from the
shares alone, so they are computed once), optionally some images kept whole, and one time per group
(independent with dual-time scheduling, else the first group's time for all). The generative loss then
uses, per token, the noisy input and the target at that token's time (the release's `gt_token`).
"""
import dataclasses
import math

import torch
from torch import Tensor

from models import TokenGroups

from .config import TokenGroupsConfig

WHOLE_IMAGE_GROUP = 1  # an image kept whole (--full-sample-prob) puts every token in the second group (release)


def group_counts(ratios, num_tokens: int) -> list[int]:
    """Tokens per group: ⌊share·T⌋, the remainder going one each to the groups with the largest
    fractional parts. In float32, as the release computes them (where two fractions tie in exact
    arithmetic, float32 rounding decides, as there); an exact float32 tie goes to the lower index."""
    expected = torch.tensor(ratios, dtype=torch.float32) * num_tokens
    counts = expected.floor()
    fractions = (expected - counts).tolist()
    counts = [int(c) for c in counts.tolist()]
    order = sorted(range(len(counts)), key=lambda g: (-fractions[g], g))
    for g in order[:num_tokens - sum(counts)]:
        counts[g] += 1
    return counts


def token_map(per_token: Tensor, patch_size: int) -> Tensor:
    """Per-token values (N, T) -> a map (N, 1, H, W) that repeats each token's value over its p×p patch
    (tokens in row-major order over the grid, as the patch embedding flattens them)."""
    n, tokens = per_token.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{tokens} tokens do not form a square grid")
    grid_values = per_token.view(n, grid, grid)
    return grid_values.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


@dataclasses.dataclass(frozen=True)
class DrawnGroups:
    """One batch's groups: ids (N, T) int64, times (N, G) in the objective's units."""

    ids: Tensor
    times: Tensor
    separate: bool
    patch_size: int

    @property
    def groups(self) -> TokenGroups:
        """What the backbone takes beside a per-group time."""
        return TokenGroups(self.ids, self.separate)

    def per_token(self, values: Tensor | None = None) -> Tensor:
        """Per-group values (N, G), by default the times -> per token (N, T)."""
        values = self.times if values is None else values
        return values.gather(1, self.ids)

    def time_map(self, values: Tensor | None = None) -> Tensor:
        """Per-group values (N, G), by default the times -> (N, 1, H, W) over the input, for the objective's
        `noisy`, `target` and `loss`."""
        return token_map(self.per_token(values), self.patch_size)


class TokenGrouping:
    """Draws DrawnGroups for batches of one model (token grid) and objective."""

    def __init__(self, config: TokenGroupsConfig, objective, num_tokens: int, patch_size: int):
        if not config.enabled:
            raise ValueError("the config has one token group; training needs no TokenGrouping")
        self.config = config
        self.objective = objective
        self.num_tokens = num_tokens
        self.patch_size = patch_size
        self.counts = group_counts(config.ratios, num_tokens)
        self.num_groups = len(self.counts)
        # The ids in sorted order, (T,): group g repeated counts[g] times; a random permutation places them.
        self._sorted_ids = torch.repeat_interleave(torch.arange(self.num_groups), torch.tensor(self.counts))

    def draw_ids(self, n: int, device, generator=None) -> Tensor:
        """(n, T) group ids: each image's tokens permuted at random into groups of `counts` tokens; with
        --full-sample-prob some images keep every token in one group. Random numbers in the release's order."""
        perm = torch.rand(n, self.num_tokens, device=device, generator=generator).argsort(dim=1)
        ordered = self._sorted_ids.to(device).expand(n, -1)
        ids = torch.empty_like(ordered).scatter_(1, perm, ordered)
        if self.config.full_sample_prob > 0:
            whole = torch.rand(n, device=device, generator=generator) < self.config.full_sample_prob
            ids = torch.where(whole[:, None], torch.full_like(ids, WHOLE_IMAGE_GROUP), ids)
        return ids

    def draw_times(self, n: int, device, generator=None) -> Tensor:
        """(n, G): the first group's time, then each other group's (dual-time) or the first one repeated."""
        first = self.objective.sample_time(n, device, generator=generator)
        if not self.config.dual_time_scheduling:
            return first[:, None].expand(-1, self.num_groups).contiguous()
        others = [self.objective.sample_time(n, device, generator=generator) for _ in range(self.num_groups - 1)]
        return torch.stack([first, *others], dim=1)

    def draw(self, n: int, device, generator=None) -> DrawnGroups:
        ids = self.draw_ids(n, device, generator)
        return DrawnGroups(ids, self.draw_times(n, device, generator), self.config.attention_separation,
                           self.patch_size)
