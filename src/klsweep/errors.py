"""Errors that end a run with a status and a one-line reason in its summary."""


class RunFailed(RuntimeError):
    """The run cannot go on: a NaN, a KL past ``kl.max``, a reward that misbehaves.
    ``status`` goes to the summary, the message to its ``reason``."""

    status = "failed"


class KLDiverged(RunFailed):
    status = "diverged"
