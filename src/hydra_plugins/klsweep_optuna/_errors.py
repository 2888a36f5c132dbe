"""The sweep's own errors: one line for the user, and the exit status that goes with it."""

from __future__ import annotations

from hydra.errors import CompactHydraException


class SweepError(CompactHydraException):
    exit_code = 1


class SweepConfigError(SweepError):
    """A bad sweep setting, found before any trial runs."""

    exit_code = 2  # as klsweep's command-line checks exit

    def __init__(self, message: str) -> None:
        super().__init__(f"klsweep: error: {message}")


class SweepStopped(SweepError):
    """Too many trials failed (``hydra.sweeper.max_failures``), or one was interrupted
    (SIGTERM, Ctrl-C): it is queued again, and the same command resumes it."""
