"""Errors that end a run with a status and a one-line reason in its summary."""


class RunFailed(RuntimeError):
    """The run cannot go on: a NaN, a KL past ``kl.max``, a reward that misbehaves.
    ``status`` goes to the summary, the message to its ``reason``."""

    status = "failed"
    exit_code = 1


class KLDiverged(RunFailed):
    status = "diverged"


class RunInterrupted(RunFailed):
    """SIGTERM or Ctrl-C stopped the run after a step, with a checkpoint to resume from."""

    status = "interrupted"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for a death by that signal

    def __reduce__(self):  # a trial's error crosses processes (submitit) pickled
        return type(self), (str(self), self.exit_code - 128)
