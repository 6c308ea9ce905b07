"""Errors a user can act on. Each carries the exit code the CLI returns.

Exit codes: 0 success, 1 runtime failure, 2 bad input (recipe, data, arguments),
3 non-finite loss or gradient, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations


class FtkitError(Exception):
    """A failure with a one-line, actionable message (no traceback without --debug)."""

    exit_code = 1
    label = "error"  # the word the CLI puts before the message


class RecipeError(FtkitError):
    """One or more problems in a recipe; `problems` holds one formatted line each."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ArgumentError(FtkitError):
    """A command-line option is missing, conflicting or out of range; the message names it."""

    exit_code = 2


class DataError(FtkitError):
    """A problem in a data file, named as `file:line: what is wrong, what to do`."""

    exit_code = 2


class ModelError(FtkitError):
    """The model, tokenizer or method cannot be built as the recipe asks."""

    exit_code = 2


class RunDirError(FtkitError):
    """The run directory cannot be used as asked (non-empty, missing, incomplete)."""

    exit_code = 2


class NonFiniteError(FtkitError):
    """Loss or gradient norm became NaN/inf; no update was applied."""

    exit_code = 3


class ResourceError(FtkitError):
    """The machine ran out of something the run needs (memory, disk); the message says how to fit."""

    exit_code = 1


class Interrupted(FtkitError):
    """Training stopped on SIGINT/SIGTERM at a step boundary, after saving; exit 128 + signal."""

    label = "interrupted"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class VerificationError(FtkitError):
    """A result failed its own check (a merge whose logits differ from base + adapter); nothing was written."""

    exit_code = 1
