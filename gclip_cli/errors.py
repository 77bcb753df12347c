"""The errors gclip raises, each tied to the exit code the CLI returns for it."""

from __future__ import annotations

from enum import IntEnum
from os import PathLike


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2
    BAD_INPUT = 3
    NONFINITE = 4
    OUTPUT = 5
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    TERMINATED = 143


class GclipError(Exception):
    """A failure that is the input's or the environment's fault, reported as one line."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, path: str | PathLike[str] | None, message: str) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def __reduce__(self) -> tuple[type, tuple[str | None, str]]:
        # picklable, so that an error raised in a child process (isolation.py) comes back whole
        return type(self), (self.path, self.message)


class InputError(GclipError):
    """The input file is missing, unreadable, malformed or of an unsupported kind."""


class NonFiniteError(GclipError):
    """The input holds NaN or Inf values and the policy is to refuse them."""

    exit_code = ExitCode.NONFINITE


class OutputError(GclipError):
    """The output cannot be written where or as asked."""

    exit_code = ExitCode.OUTPUT


class UsageError(GclipError):
    """An option value that makes no sense (the CLI reports these as usage errors)."""

    exit_code = ExitCode.USAGE


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM handler, so that cleanup runs as for Ctrl-C."""


class Interrupted(BaseException):
    """Raised by the gclip command's SIGINT handler (Ctrl-C): as KeyboardInterrupt, which
    Click would turn into "Aborted!" and exit status 1 while it parses the command line."""
