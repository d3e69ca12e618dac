"""Dual-time scheduling and attention separation (the SRA authors' "From SRA to Self-Flow", arXiv
2607.02508; release folder `SiT-SRA_DTS_AS`; docs/SPEC.md §7).

The tokens of each training image are split at random into groups (`--mask-ratio 0.25`: 25 % and
75 %). With dual-time scheduling every group gets its own time, so one image is noised to several
levels at once and the backbone's adaLN conditioning is per token; with attention separation tokens
attend only within their group. It changes how the training loss draws times and what the backbone
sees, for any guidance method (`sra`, `repa`, `none`); SRA's teacher follows the groups as
`--teacher-t` and `--teacher-mask` say (sra/method.py). Sampling is unchanged: one time per image.
"""
from .config import TokenGroupsConfig, parse_ratios
from .groups import DrawnGroups, TokenGrouping, group_counts, token_map

__all__ = ["DrawnGroups", "TokenGrouping", "TokenGroupsConfig", "group_counts", "parse_ratios", "token_map"]
