"""A study's grid: named settings (train.py flags) × seeds, each run in its own directory,
RESULTS_DIR/NAME/SETTING/seed<S>, so that rerunning the study resumes it run by run.

A grid comes from flags or a JSON file:

    {"name": "sra-vs-baseline", "data_dir": "data/imagenet256", "seeds": [0, 1, 2],
     "common": "--eval-every 50000 --eval-ref data/ref10k.npz",
     "settings": {"baseline": "--preset sit-b2", "sra": "--preset sit-b2-sra"},
     "baseline": "baseline"}

The study sets --data-dir, --seed, --results-dir and --run-name of each run itself; a setting that sets
them is refused. Every run's flags are resolved by train.py's own parser before anything runs.
"""
import dataclasses
import json
import re
import shlex
from pathlib import Path

from configs import cli
from errors import UserError
from training.checkpoints import list_checkpoints

DEFAULT_RESULTS_DIR = Path("results") / "studies"
OWNED_FLAGS = ("--data-dir", "--seed", "--results-dir", "--run-name", "--dry-run")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a directory name on every filesystem


@dataclasses.dataclass(frozen=True)
class Run:
    setting: str
    seed: int
    argv: tuple[str, ...]  # train.py's arguments
    run_dir: Path
    max_steps: int

    def finished_step(self) -> int:
        """The newest checkpoint's step (0 without one): the run is done at max_steps."""
        found = list_checkpoints(self.run_dir / "checkpoints")
        return found[-1][0] if found else 0

    @property
    def done(self) -> bool:
        return self.finished_step() >= self.max_steps


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    settings: dict  # setting -> tuple of train.py flags
    seeds: tuple[int, ...]
    common: tuple[str, ...]
    data_dir: str
    baseline: str | None
    results_dir: Path

    @property
    def directory(self) -> Path:
        return self.results_dir / self.name

    def runs(self) -> list[Run]:
        """Every (setting, seed), resolved by train.py's parser: a flag mistake is reported before any run."""
        runs = []
        for setting, flags in self.settings.items():
            for seed in self.seeds:
                argv = (*flags, *self.common, "--data-dir", self.data_dir, "--seed", str(seed),
                        "--results-dir", str(self.directory / setting), "--run-name", f"seed{seed}")
                try:
                    _, config = cli.parse(list(argv))
                except UserError as error:
                    raise UserError(f"setting {setting!r}: {error}") from None
                run_dir = self.directory / setting / f"seed{seed}"
                runs.append(Run(setting, seed, argv, run_dir, config.optim.max_steps))
        return runs


def _flags(value, where) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UserError(f"{where}: expected a string of flags or a list of strings, got {value!r}")


def _setting(text) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep:
        raise UserError(f"--setting {text!r}: expected NAME=\"train.py flags\"")
    return name.strip(), flags


def load_study(grid_file=None, name=None, settings=(), seeds=None, common=None, data_dir=None, baseline=None,
               results_dir=DEFAULT_RESULTS_DIR) -> Study:
    """A Study from a JSON grid file and/or flags (flags win), checked."""
    spec = {}
    if grid_file is not None:
        path = Path(grid_file)
        if not path.is_file():
            raise UserError(f"grid file not found: {path}")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(spec, dict):
            raise UserError(f"{path}: expected a JSON object with name, data_dir, seeds, settings")
        unknown = sorted(set(spec) - {"name", "data_dir", "seeds", "common", "settings", "baseline"})
        if unknown:
            raise UserError(f"{path}: unknown keys {', '.join(unknown)}")
    named = dict(spec.get("settings") or {})
    if not isinstance(named, dict):
        raise UserError("settings: expected an object {name: flags}")
    for text in settings:
        key, flags = _setting(text)
        named[key] = flags
    named = {key: _flags(flags, f"setting {key!r}") for key, flags in named.items()}
    name = name or spec.get("name")
    data_dir = data_dir or spec.get("data_dir")
    seeds = tuple(seeds if seeds is not None else spec.get("seeds") or ())
    common = _flags(common if common is not None else spec.get("common", ""), "common")
    baseline = baseline if baseline is not None else spec.get("baseline")
    problems = []
    if not name or not NAME.match(str(name)):
        problems.append(f"the study needs a --name of letters, digits, '.', '_' or '-' (got {name!r})")
    if not data_dir:
        problems.append("the study needs --data-dir")
    if not named:
        problems.append("the study needs at least one --setting NAME=\"flags\"")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        problems.append(f"the study needs --seeds, non-negative integers (got {list(seeds)})")
    elif len(set(seeds)) != len(seeds):
        problems.append(f"--seeds repeats a seed: {list(seeds)}")
    bad_names = [key for key in named if not NAME.match(key)]
    if bad_names:
        problems.append(f"setting names must be directory names: {', '.join(map(repr, bad_names))}")
    if baseline is not None and baseline not in named:
        problems.append(f"--baseline {baseline!r} is not one of the settings ({', '.join(named)})")
    for key, flags in [*named.items(), ("common", common)]:
        owned = [flag for flag in flags if flag.split("=")[0] in OWNED_FLAGS]
        if owned:
            problems.append(f"{key}: {', '.join(owned)} is set by the study itself")
    if problems:
        raise UserError("; ".join(problems))
    return Study(str(name), named, seeds, common, str(data_dir), baseline, Path(results_dir))
