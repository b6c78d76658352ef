"""The error family every layer raises for the user, cancellation, and the progress event long work reports."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field


class BinsightError(Exception):
    """Something the user can fix (a wrong path, unusable data, an impossible setting): the message says what.

    The CLI prints it as one line and exits 2; a job fails with it; a page shows it. Anything else that
    escapes is a programming error and is reported as such, with its traceback.
    """


class UsageError(BinsightError):
    """A command-line call that cannot work as given."""


class Cancelled(BinsightError):
    """Long work (training, feature extraction, prediction) stopped because it was asked to; what was saved stays."""


class CancelToken:
    """A thread-safe stop flag, optionally also raised by a callable (a job's cancel check, say)."""

    def __init__(self, should_stop=None):
        self._event = threading.Event()
        self._should_stop = should_stop

    def cancel(self) -> None:
        self._event.set()

    def __call__(self) -> bool:
        if not self._event.is_set() and self._should_stop is not None and self._should_stop():
            self._event.set()
        return self._event.is_set()

    def check(self, what: str = "work") -> None:
        """Raise Cancelled when a stop was asked for."""
        if self():
            raise Cancelled(f"{what} was stopped")


@dataclass
class ProgressEvent:
    """One report of long work: how far (0–1), what is happening, and the stage's figures."""

    fraction: float = 0.0
    message: str = ""
    stage: str = ""
    done: int | None = None
    total: int | None = None
    images_per_s: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**data.pop("extra"), **{k: v for k, v in data.items() if v is not None}}


def describe_error(exc: BaseException) -> str:
    """One readable sentence for a page or a failed job; the traceback belongs in the log."""
    name = type(exc).__name__
    if "OutOfMemory" in name or isinstance(exc, MemoryError):
        return f"Out of memory ({name}): lower the batch size or the image size and launch again."
    if isinstance(exc, BinsightError):
        return str(exc) or name
    return f"{name}: {exc}"
