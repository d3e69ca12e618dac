"""A study's grid: named settings (train.py flags) × seeds, each run in its own directory,
RESULTS_DIR/NAME/SETTING/seed<S>, so that rerunning the study resumes it run by run.

A grid comes from flags or a JSON file:

    {"name": "sra-vs-baseline", "data_dir": "data/imagenet256", "seeds": [0, 1, 2],
     "common": "--eval-every 50000 --eval-ref data/ref10k.npz",
     "settings": {"baseline": "--preset sit-b2", "sra": "--preset sit-b2-sra"},
     "baseline": "baseline"}

The study sets --data-dir, --seed, --results-dir and --run-name of each run itself; a setting that sets
them is refused. Every run's flags are resolved by train.py's own parser before anything runs, and a run
directory that already holds a run is checked against them (`check_recorded`): a finished run is reused,
and an interrupted one resumed, only under the flags it was trained with (train.py's resume rule).
"""
import dataclasses
import json
import re
import shlex
from pathlib import Path

import torch

from configs import cli
from errors import UserError
from preprocessing import store
from training.checkpoints import list_checkpoints
from training.fid import reference_sha256
from training.setup import reference_identity, resume_differences

DEFAULT_RESULTS_DIR = Path("results") / "studies"
OWNED_FLAGS = ("--data-dir", "--seed", "--results-dir", "--run-name", "--dry-run")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a directory name on every filesystem
# What a finished run's in-training FID was computed with: train.py lets a resumed run change them, but a
# finished run the study reuses keeps the values it was evaluated with.
TRAINING_FID = ("eval_ref", "eval_samples", "eval_steps", "vae")


@dataclasses.dataclass(frozen=True)
class Run:
    setting: str
    seed: int
    argv: tuple[str, ...]  # train.py's arguments
    run_dir: Path
    max_steps: int
    config: dict = dataclasses.field(default=None, compare=False, repr=False)  # the resolved config, as recorded

    def finished_step(self) -> int:
        """The newest checkpoint's step (0 without one): the run is done at max_steps."""
        found = list_checkpoints(self.run_dir / "checkpoints")
        return found[-1][0] if found else 0

    @property
    def done(self) -> bool:
        return self.finished_step() >= self.max_steps

    def recorded(self) -> dict | None:
        """The record of the run its checkpoints hold (config.json as train.py wrote it, else the newest
        checkpoint's), or None without a checkpoint: train.py would start such a run afresh."""
        found = list_checkpoints(self.run_dir / "checkpoints")
        if not found:
            return None
        path = self.run_dir / "config.json"
        if path.is_file():
            return store.read_json(path)
        try:
            state = torch.load(found[-1][1], map_location="cpu", weights_only=True, mmap=True)
            return dict(state["config"])
        except Exception as error:  # unreadable: train.py reports it when it resumes the run
            raise UserError(f"{self.run_dir} has no config.json and its newest checkpoint {found[-1][1].name} "
                            f"cannot be read ({type(error).__name__}); restore its config.json") from None


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
                runs.append(Run(setting, seed, argv, run_dir, config.optim.max_steps, config.to_dict()))
        return runs


def _dataset_checksum(data_dir):
    """The dataset's identity by content (index.json's checksum), or None where there is no index here
    (a report on a machine without the data: train.py checks the data of what it trains)."""
    index = Path(data_dir) / store.INDEX_FILE
    return store.read_json(index).get("checksum") if index.is_file() else None


def _differences(old: dict, new: dict) -> str | None:
    """What differs between a run's record and the new one by train.py's resume rule (resume_differences),
    or None; a changed guidance method stands for the settings that come with it."""
    changed = resume_differences(old, new)
    if not changed:
        return None
    old_method, new_method = ((record.get("guidance") or {}).get("method") for record in (old, new))
    found = [f"guidance.method: {old_method!r} -> {new_method!r}"] if old_method != new_method else []
    found += [f"{key}: {before!r} -> {now!r}" for key, before, now in changed
              if old_method == new_method or not key.startswith("guidance.")]
    return "; ".join(found)


def _same_reference(saved: dict, eval_ref, hashes: dict) -> bool:
    """Whether `eval_ref` is the reference a run's FID rows were computed against: by the content train.py
    recorded (or, for older records, of the file they name where it still exists), else by path. Without
    the file here (a report on another machine) there is nothing to compare, and the run keeps its result.
    `hashes` holds each file's hash for the other runs of the same check."""
    saved = reference_identity(saved)
    recorded = (saved.get("identity") or {}).get("eval_ref_statistics_sha256")
    if recorded is None:
        return (saved.get("output") or {}).get("eval_ref") == eval_ref
    if eval_ref is None or not Path(eval_ref).is_file():
        return eval_ref is not None
    if eval_ref not in hashes:
        hashes[eval_ref] = reference_sha256(eval_ref)
    return hashes[eval_ref] == recorded


def check_recorded(runs, data_dir, training_fid=True) -> None:
    """Refuse, before anything runs, a run directory whose run was trained with other flags than its
    setting's now, or on other data (by content): train.py's own resume rule (training.setup
    .check_resumable), so only what a resumed run may change (--max-steps, output and logging flags)
    may differ. A finished run whose result is its in-training FID (`training_fid`) must also keep the
    --eval-ref, --eval-samples, --eval-steps and --vae it was evaluated with."""
    checksum, hashes = _dataset_checksum(data_dir), {}
    for run in runs:
        saved = run.recorded()
        if saved is None:
            continue
        where = f"setting {run.setting!r} seed {run.seed}: {run.run_dir}"
        old = {key: value for key, value in saved.items() if key not in ("data", "identity")}
        new = dict(run.config)
        if checksum is not None:  # the other data facts follow from it and the number of processes (train.py's)
            old["data"] = {"dataset_checksum": (saved.get("data") or {}).get("dataset_checksum")}
            new["data"] = {"dataset_checksum": checksum}
        details = _differences(old, new)
        if details:
            raise UserError(f"{where} holds a run trained with other flags or data ({details}); give the setting "
                            "its original flags (a larger --max-steps continues it), or give the new flags a new "
                            "setting name (or the study a new --name)")
        old_output, new_output = saved.get("output") or {}, run.config["output"]
        if training_fid and run.done and old_output.get("eval_every") and old_output.get("eval_ref"):
            changed = [f"--{key.replace('_', '-')} {old_output.get(key)!r} -> {new_output.get(key)!r}"
                       for key in TRAINING_FID if key != "eval_ref" and old_output.get(key) != new_output.get(key)]
            if not _same_reference(saved, new_output.get("eval_ref"), hashes):
                changed.insert(0, f"--eval-ref {old_output.get('eval_ref')!r} -> {new_output.get('eval_ref')!r}")
            if changed:
                raise UserError(f"{where}: its result, the in-training FID at step {run.max_steps}, was computed "
                                f"with other settings ({', '.join(changed)}); give the original ones, or evaluate "
                                "every run anew with --evaluate-ref")


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
