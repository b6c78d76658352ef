"""The label-issue check re-run in the background after labels change: one thread per dataset, the newest labels
win, and the pages swap the fresh results in when it is done (seconds when the features are cached)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from core import config
from core.errors import BinsightError
from core.evaluation.label_issues import find_label_issues

_lock = threading.Lock()
_checks: dict[tuple[str, str], "RecheckState"] = {}


@dataclass
class RecheckState:
    """Where a dataset's background re-check stands: running, its progress, the last error and when it ended."""

    running: bool = False
    fraction: float = 0.0
    text: str = ""
    error: str = ""
    finished_at: float | None = None
    pending: object = None  # a dataset with newer labels, checked once the running check ends


def recheck_state(dataset_key: str) -> RecheckState:
    with _lock:
        return _checks.setdefault((str(config.home()), dataset_key), RecheckState())


def recheck(dataset, issues) -> RecheckState:
    """Start re-checking `dataset` in the background when `issues` (current_label_issues) are stale; a check already
    running goes on and the newest labels are checked after it. Returns the state of the re-check."""
    key = (str(config.home()), dataset.key)
    with _lock:
        state = _checks.setdefault(key, RecheckState())
        if issues is None or not issues.info.get("stale"):
            return state
        if state.running:
            state.pending = dataset
            return state
        state.running, state.fraction, state.text, state.error, state.pending = True, 0.0, "Starting…", "", None
    threading.Thread(target=_run, args=(key, dataset), name=f"recheck-{dataset.key}", daemon=True).start()
    return state


def _run(key: tuple[str, str], dataset) -> None:
    state = _checks[key]

    def progress(fraction: float, text: str) -> None:
        state.fraction, state.text = fraction, text

    while dataset is not None:
        try:
            find_label_issues(dataset, on_progress=progress)
            error = ""
        except (BinsightError, OSError, ValueError, RuntimeError) as exc:  # shown on the pages; the old ranking stays
            error = str(exc)
        with _lock:
            dataset, state.pending = state.pending, None
            state.error = error
            if dataset is None:
                state.running, state.finished_at = False, time.time()
