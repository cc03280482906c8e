"""The one exception type a user ever sees: what is wrong and what to do, one line per problem."""


class PrunectlError(Exception):
    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class RunFailed(Exception):
    """A run that did not complete: the CLI prints `error: <ref> failed: <reason>` (and its log) and exits 1."""

    def __init__(self, ref: str, reason: str, log: str | None = None) -> None:
        super().__init__(f"{ref} failed: {reason}" + (f" (log: {log})" if log else ""))
        self.ref, self.reason, self.log = ref, reason, log


class Stopped(BaseException):
    """SIGTERM or SIGUSR2 while work runs in this process: it stops, and the run it writes is marked failed (a
    rerun resumes it). Like KeyboardInterrupt, no `except Exception` swallows it."""


def raise_stopped(signum: int, frame) -> None:
    """A signal handler: turn the signal into Stopped."""
    import signal

    raise Stopped(f"stopped by {signal.Signals(signum).name}")
