"""The project's one exception type for a user's mistakes, and how every entry point reports it.

A wrong path, a flag out of range, a mismatched checkpoint or a malformed file raises `UserError`
with a message that names the problem. The entry points (`train.py`, `sample_ddp.py`,
`python -m preprocessing`, `python -m evaluations.evaluator`, `python -m evaluations.clip_score`,
`python -m analysis`, `python -m demo`)
run their `main` through `run_cli`, which prints that message as one line, `error: …`, and exits
with code 2, as argparse does for a bad flag. Any other exception is a bug and keeps its traceback.
"""
import argparse
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2  # argparse's exit status for a usage error


class UserError(ValueError):
    """A mistake in what the user asked for. A subclass of ValueError, so library callers that catch
    ValueError keep working; the message is one line that says what is wrong and, where it helps,
    what to do instead."""


def run_cli(main, argv=None):
    """Call `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as error:
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one line under run_cli (instead of the usage block),
    with argparse's exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def check_output_dir(directory, flag: str) -> None:
    """Error unless `directory` (given as `flag`) is a folder, or can be created as one, that this user may
    write in. Creates nothing, so that a run refused later leaves no trace."""
    directory = Path(directory)
    nearest = next(path for path in [directory.absolute(), *directory.absolute().parents] if path.exists())
    if not nearest.is_dir():
        where = ("exists and is not a directory" if nearest == directory.absolute()
                 else f"cannot be created: {nearest} is not a directory")
        raise UserError(f"{flag} {directory} {where}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {directory}: no permission to write in {nearest}")
