"""Jobs in words for the Train page and the CLI: durations, a job's parameters, its stage, the search form's defaults."""
from __future__ import annotations

from collections import Counter

from core.jobs.estimates import input_shape
from core.jobs.runs import short_backbone
from core.training.config import search_space

STAGES = {"features": "Computing backbone features", "train": "Training", "evaluate": "Evaluating on the test split",
          "search": "Searching", "sleep": "Checking the queue", "done": "Finishing"}


def duration(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'; '–' when unknown."""
    if seconds is None:
        return "–"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def params_summary(params: dict) -> str:
    """One line for a job's params: 'efficientnet_lite0 · frozen · 40 epochs · batch 32 · lr 0.0001 · 224 px'."""
    if "seconds" in params and "backbone" not in params:
        return f"{params['seconds']} s check"
    parts = [params.get("backbone", "?"), params.get("mode", "?")]
    if (params.get("ensemble") or 1) > 1 or params.get("also_backbone"):
        members = f"ensemble of {params.get('ensemble') or 1}"
        if params.get("also_backbone"):
            members += f" + {params.get('ensemble') or 1} on {params['also_backbone']}"
        parts.append(members)
    if params.get("refit"):
        parts.append("refit on train and valid")
    if params.get("epochs"):
        parts.append(f"{params['epochs']} epochs")
    if params.get("batch_size"):
        parts.append(f"batch {params['batch_size']}")
    if params.get("lr"):
        parts.append(f"lr {params['lr']:g}")
    if params.get("image_size"):
        height, aspect = input_shape(params)
        parts.append(f"{height} px" if aspect == 1.0 else f"{height}×{round(height * aspect)} px")
    if params.get("balance") and params["balance"] != "none":
        parts.append(f"balance {params['balance']}")
    if params.get("n_trials"):
        parts.append(f"{params['n_trials']} trials")
    return " · ".join(str(p) for p in parts)


def ensemble_summary(metrics: dict) -> str:
    """What an ensemble is: its models per backbone, and the epochs they trained (chosen on valid)."""
    members = metrics["members"]
    per_backbone = Counter(short_backbone(m.get("backbone") or metrics.get("backbone")) for m in members)
    text = f"an ensemble of {len(members)} models"
    if len(per_backbone) > 1:
        text += " (" + ", ".join(f"{n} on {name}" for name, n in per_backbone.items()) + ")"
    if metrics.get("refit_epochs"):
        epochs = ", ".join(str(e) for e in dict.fromkeys(metrics["refit_epochs"].values()))
        return text + f", refit on train and valid for the epochs valid chose ({epochs})"
    return text + ", each kept at its best valid epoch"


def progress_text(progress: dict) -> str:
    """What a running job is doing: 'Training — epoch 3/6 · <its last message>'."""
    stage = progress.get("stage") or "starting"
    text = STAGES.get(stage, stage)
    if progress.get("epoch") and stage == "train":
        text += f" — epoch {progress['epoch']}/{progress.get('epochs', '?')}"
    if progress.get("message"):
        text += f" · {progress['message']}"
    return text


def trial_epochs(base: dict) -> int:
    """A search trial's default epochs: frozen epochs are cheap once the features are cached; fine-tuning trials are
    kept short."""
    return int(base["epochs"]) if base["mode"] == "frozen" else min(int(base["epochs"]), 3)


def search_params(base: dict, n_trials: int, parallel: int, trial_epochs: int, full_epochs: int) -> dict:
    """An 'hpo' job's params: the training form's settings but the searched ones, epochs per trial and the search's
    own counts."""
    searched = search_space()
    return {**{k: v for k, v in base.items() if k not in searched}, "epochs": int(trial_epochs), "n_trials": int(n_trials), "parallel": int(parallel),
            "full_epochs": int(full_epochs)}
