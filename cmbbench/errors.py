"""Errors raised on bad input, each carrying a documented process exit code.

Every error message is a single line that names the offending file (when there is one) and
the problem. The command line prints ``cmbbench: error: <message>`` and exits with
:attr:`CmbbenchError.exit_code`. The codes are documented in ``docs/cli.md``.
"""

from __future__ import annotations

from pathlib import Path


class CmbbenchError(Exception):
    """Base class for user-facing errors.

    Parameters
    ----------
    message
        What is wrong, in one line.
    path
        The file or folder concerned, if any; it is prefixed to the message.
    """

    exit_code: int = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = " ".join(str(message).split())  # force a single line
        text = f"{self.path}: {self.problem}" if self.path is not None else self.problem
        super().__init__(text)


class MissingInputError(CmbbenchError):
    """A required file or folder does not exist, or a folder holds no usable files."""

    exit_code = 3


class UnreadableInputError(CmbbenchError):
    """A file exists but cannot be parsed (corrupt NIfTI, malformed CSV or JSON)."""

    exit_code = 4


class GeometryMismatchError(CmbbenchError):
    """A prediction's grid (shape or affine) differs from the reference image's grid."""

    exit_code = 5


class InvalidValuesError(CmbbenchError):
    """Values are out of the allowed range (NaN, probabilities outside [0, 1], negative labels)."""

    exit_code = 6


class ConfigurationError(CmbbenchError):
    """An unknown rule name, an invalid option combination or an inconsistent parameter."""

    exit_code = 7


class PartialFailureError(CmbbenchError):
    """Some scans of a run failed (the method raised on them) while the others finished.

    The finished scans are kept; re-running the same command retries only the failed ones.
    """

    exit_code = 8


class InvalidSubmissionError(CmbbenchError):
    """A submission was refused: ``cmbbench validate`` found problems (all of them are listed in
    :attr:`problems`), or a ``.zip`` is unsafe (path traversal, absolute paths, links, declared
    size or file count over the limits). Nothing is written to the store."""

    exit_code = 9

    def __init__(self, message: str, path: str | Path | None = None, *,
                 problems: list[str] | None = None) -> None:
        super().__init__(message, path)
        self.problems = list(problems or [])


class StoreError(CmbbenchError):
    """The results store cannot be opened, created or written (bad URL, unreachable server,
    a file that is not a cmbbench store, a lock held longer than the timeout)."""

    exit_code = 10


class ConsistencyError(CmbbenchError):
    """An internal invariant failed (e.g. TP + FN != number of references): a bug, not bad input."""

    exit_code = 70


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error",
    2: "command-line usage error (unknown option, missing argument)",
    MissingInputError.exit_code: "missing input: file/folder absent, empty folder, scan without prediction",
    UnreadableInputError.exit_code: "unreadable input: corrupt NIfTI, malformed CSV/JSON",
    GeometryMismatchError.exit_code: "geometry mismatch: prediction shape or affine differs from the image",
    InvalidValuesError.exit_code: "invalid values: NaN, probability outside [0, 1], negative label",
    ConfigurationError.exit_code: "configuration error: unknown rule name, invalid option",
    PartialFailureError.exit_code: "partial failure: some scans failed, the others finished "
                                   "(re-run to retry only the failed ones)",
    InvalidSubmissionError.exit_code: "invalid submission: validation problems (all listed), or "
                                       "an unsafe/oversized .zip; nothing stored",
    StoreError.exit_code: "results store error: cannot open, create or write the store",
    ConsistencyError.exit_code: "internal consistency check failed (please report)",
}
