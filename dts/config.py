"""The token-group flags: a section of the training config (configs/schema.py)."""
import argparse
import dataclasses
import math

from configs.fields import check_range, option
from errors import UserError

# The release's script for SiT-B/2 (SiT-SRA_DTS_AS/scripts/train.sh): two groups of 25 % and 75 %.
RELEASE_MASK_RATIO = (0.25,)


def parse_ratios(text) -> tuple[float, ...]:
    """`--mask-ratio` text -> shares: "0.25" (two groups, 25 % / 75 %), "0.5,0.3,0.2" (three groups,
    normalized by their sum) or "0" (one group: off)."""
    if isinstance(text, (tuple, list)):
        values = [float(v) for v in text]
    elif str(text).strip().lower() in ("none", "off"):
        values = []
    else:
        try:
            values = [float(part) for part in str(text).split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a share like 0.25 or shares like 0.5,0.3,0.2, got {text!r}") from None
    if not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"shares must be finite numbers, got {text!r}")
    return tuple(values)


@dataclasses.dataclass(frozen=True)
class TokenGroupsConfig:
    """How each image's tokens are split into groups during training (dts/)."""

    mask_ratio: tuple = option(
        (), "split each image's tokens at random into groups of these shares: 0.25 is 1/4 and 3/4 (the release's "
        "value), 0.5,0.3,0.2 three groups; 0 or none is one group", type=parse_ratios, families=("SiT",))
    dual_time_scheduling: bool = option(
        False, "draw each group's time independently, so the conditioning is per token (needs --mask-ratio)",
        families=("SiT",))
    attention_separation: bool = option(
        False, "tokens attend only to tokens of their own group (needs --mask-ratio)", families=("SiT",))
    full_sample_prob: float = option(
        0.0, "share of images that stay whole, every token in the second group (two groups only)",
        minimum=0.0, maximum=1.0, families=("SiT",))

    def __post_init__(self):
        problem = check_range(self)
        if problem:
            raise UserError(problem)
        ratios = self.mask_ratio
        if len(ratios) == 1 and not 0.0 <= ratios[0] < 1.0:
            raise UserError(f"--mask-ratio {ratios[0]}: one share must be in [0, 1): the first group's share "
                            "(0 keeps one group)")
        if len(ratios) > 1 and any(r <= 0 for r in ratios):
            raise UserError(f"--mask-ratio {','.join(map(str, ratios))}: every share of several must be > 0")
        if not self.enabled:
            used = [flag for flag, on in (("--dual-time-scheduling on", self.dual_time_scheduling),
                                          ("--attention-separation on", self.attention_separation),
                                          ("--full-sample-prob", self.full_sample_prob > 0)) if on]
            if used:
                raise UserError(f"{' and '.join(used)} need token groups: give --mask-ratio (e.g. 0.25)")
            return
        if not (self.dual_time_scheduling or self.attention_separation):
            raise UserError("--mask-ratio splits the tokens into groups, which changes nothing without "
                            "--dual-time-scheduling on or --attention-separation on")
        if self.full_sample_prob > 0 and len(self.ratios) != 2:
            raise UserError(f"--full-sample-prob needs two groups; --mask-ratio gives {len(self.ratios)}")

    @property
    def ratios(self) -> tuple[float, ...]:
        """Each group's share of the tokens, summing to 1; (1.0,) for one group (release's rule)."""
        ratios = self.mask_ratio
        if not ratios or (len(ratios) == 1 and ratios[0] == 0.0):
            return (1.0,)
        if len(ratios) == 1:
            return (ratios[0], 1.0 - ratios[0])
        total = sum(ratios)
        return tuple(r / total for r in ratios)

    @property
    def enabled(self) -> bool:
        return len(self.ratios) > 1
