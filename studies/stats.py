"""The statistics of a study: per setting the mean over seeds, the standard deviation, a 95 % interval, and
whether the setting differs from the baseline by more than the seed-to-seed spread.

The test is Welch's two-sided t-test (unequal variances) of the per-seed values of a setting against the
baseline's, at α = 0.05; with fewer than two seeds on either side no test is possible and the table says
so. The interval is mean ± t_{0.975, n−1}·s/√n (Student's t, s the sample standard deviation, ddof 1).
"""
import dataclasses
import math

from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided significance level of the test against the baseline


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1); nan for one value
    ci_half_width: float  # half the width of the 95 % interval; nan for one value

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.ci_half_width, self.mean + self.ci_half_width


def summarize(values) -> Summary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarize")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Summary(n, mean, std, stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n))


@dataclasses.dataclass(frozen=True)
class Comparison:
    difference: float  # mean of the setting − mean of the baseline
    p_value: float | None  # Welch's t-test; None when a side has fewer than two values
    significant: bool | None

    def verdict(self) -> str:
        if self.p_value is None:
            return "n/a (needs 2+ seeds on both sides)"
        if math.isnan(self.p_value):  # every seed gave the same value on both sides: nothing to test against
            return "no spread to test"
        return f"{'yes' if self.significant else 'no'} (p = {self.p_value:.3g})"


def compare(values, baseline_values) -> Comparison:
    values, baseline_values = [float(v) for v in values], [float(v) for v in baseline_values]
    difference = summarize(values).mean - summarize(baseline_values).mean
    if len(values) < 2 or len(baseline_values) < 2:
        return Comparison(difference, None, None)
    if summarize(values).std == 0 and summarize(baseline_values).std == 0:  # the test's variance would be 0
        return Comparison(difference, math.nan, None)
    p_value = float(stats.ttest_ind(values, baseline_values, equal_var=False).pvalue)
    return Comparison(difference, p_value, None if math.isnan(p_value) else p_value < ALPHA)
