"""Studies: a grid of train.py runs (settings × seeds), run one after another or printed as commands for a
cluster, then a table with the spread over seeds and a test against the baseline, and FID curves with
bands (`python -m studies`)."""
from .grid import Run, Study, load_study
from .stats import Summary, compare, summarize

__all__ = ["Run", "Study", "Summary", "compare", "load_study", "summarize"]
