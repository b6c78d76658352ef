"""Hyperparameter search like the original study's tuner: Optuna over TrainConfig's searchable settings (their
metadata's search space: learning rate 0.001–0.1 log-uniform, batch size {16, 32, 64, 128, 256}), minimising the
final valid loss; a search runs as one job."""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pandas as pd

from core.errors import Cancelled, describe_error
from core.files import atomic_write_json
from core.gpu import cpu_cores
from core.jobs import queue as jobs
from core.jobs.params import training_problems
from core.training import config as training_config

RESULTS_FILE = "trials.json"
DEFAULT_TRIALS = 10
SEARCH_ONLY = ("n_trials", "parallel", "full_epochs")  # params of the search itself, not of its trainings


def batch_choices(n_train: int) -> list[int]:
    """The searched batch sizes that fit the training set (the smallest always stays, so there is a choice)."""
    sizes = sorted(training_config.search_space()["batch_size"]["choice"])
    fitting = [b for b in sizes if b <= n_train]
    return fitting or sizes[:1]


def search_space(n_train: int | None = None) -> dict[str, dict]:
    """The space searched, from TrainConfig's metadata; batch sizes larger than the training set are left out."""
    space = dict(training_config.search_space())
    if n_train is not None and "batch_size" in space:
        space["batch_size"] = {"choice": tuple(batch_choices(n_train))}
    return space


def describe_space(space: dict[str, dict]) -> str:
    """'lr 0.001–0.1 (log-uniform), batch_size in {16, 32}'."""
    parts = []
    for name, spec in space.items():
        if "choice" in spec:
            parts.append(f"{name} in {{{', '.join(str(v) for v in spec['choice'])}}}")
        else:
            kind = next(iter(spec))
            low, high = spec[kind]
            parts.append(f"{name} {low:g}–{high:g} ({kind.replace('_', '-')})")
    return ", ".join(parts)


def suggest(trial, space: dict[str, dict]) -> dict:
    """One trial's values: a float range ("log_uniform" or "uniform") or a choice per searched setting."""
    values = {}
    for name, spec in space.items():
        if "choice" in spec:
            values[name] = trial.suggest_categorical(name, list(spec["choice"]))
        elif "log_uniform" in spec:
            values[name] = trial.suggest_float(name, *spec["log_uniform"], log=True)
        else:
            values[name] = trial.suggest_float(name, *spec["uniform"])
    return values


def search_problems(params: dict, n_train: int, cuda_available: bool) -> list[str]:
    """Why a search with these params cannot run (empty when it can): its own counts, and its trainings checked with
    the smallest value of each searched setting."""
    problems = [message for key, message in (("n_trials", "the number of trials must be at least 1"),
                                             ("parallel", "trials in parallel must be at least 1"),
                                             ("full_epochs", "the full training needs at least 1 epoch"))
                if params.get(key) is not None and params[key] < 1]
    smallest = {name: min(spec["choice"]) if "choice" in spec else next(iter(spec.values()))[0]
                for name, spec in search_space(n_train).items()}
    return problems + training_problems(params | smallest, n_train, cuda_available)


def parallel_trials(requested: int, device: str, cores: int | None = None) -> tuple[int, str]:
    """How many trials run at once: several per GPU, on the CPU one per 4 cores (trials share the cores)."""
    requested = max(1, int(requested))
    if cores is None:
        cores = cpu_cores()
    if str(device).startswith("cuda"):
        allowed, why = min(requested, 4), "at most 4 trials share one GPU"
    else:
        allowed, why = min(requested, max(1, cores // 4)), f"{cores} CPU cores allow {max(1, cores // 4)} at a time"
    return allowed, ("" if allowed == requested else why)


def final_valid_loss(metrics: dict | None, last_progress: dict) -> float:
    """The last epoch's valid loss, from the returned metrics' history, else from the last progress report."""
    history = (metrics or {}).get("history") or []
    for point in reversed(history):
        if isinstance(point, dict) and point.get("valid_loss") is not None:
            return float(point["valid_loss"])
    if last_progress.get("valid_loss") is not None:
        return float(last_progress["valid_loss"])
    raise jobs.JobError("the training reported no valid loss (is the valid split empty?)")


def run_search(ctx) -> None:
    """The worker's runner for an 'hpo' job (ctx: core.jobs.context.JobContext)."""
    import optuna

    from core.jobs.context import check_dataset
    from core.training import loop as training

    job, params = ctx.job, dict(ctx.job.params)
    check_dataset(params)
    out = Path(job.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_trials = max(1, int(params.get("n_trials") or DEFAULT_TRIALS))
    space = search_space(int(params["n_train"]) if params.get("n_train") else None)
    parallel, why = parallel_trials(int(params.get("parallel") or 1), ctx.device)
    base = {k: v for k, v in params.items() if k not in SEARCH_ONLY}
    lock = threading.Lock()
    state = {"stage": "search", "n_trials": n_trials, "parallel": parallel, "parallel_note": why, "trials": [],
             "running": {}, "fraction": 0.0, "device": ctx.device, "space": space}
    ctx.log(f"search: {n_trials} trials, {parallel} at a time{' (' + why + ')' if why else ''}: {describe_space(space)}")

    def publish(force: bool = False) -> None:
        with lock:
            done = len(state["trials"])
            running = sum(p.get("fraction") or 0.0 for p in state["running"].values())
            state["fraction"] = min(1.0, (done + running) / n_trials)
            snapshot = json.loads(json.dumps(state, default=str))
        ctx.report(snapshot, force=force)

    def objective(trial) -> float:
        if ctx.should_stop():
            raise Cancelled("the search was stopped")
        values = suggest(trial, space)
        trial_out = out / f"trial-{trial.number:03d}"
        train_config = training_config.TrainConfig.from_params({**base, **values}, trial_out, ctx.device)
        progress = _TrialProgress(trial.number, state, lock, publish)
        trial.set_user_attr("started", time.time())
        metrics = training.train(train_config, on_progress=progress, should_stop=ctx.should_stop)
        trial.set_user_attr("valid_acc", progress.last.get("valid_acc"))
        trial.set_user_attr("speeds", progress.speeds)
        return final_valid_loss(metrics, progress.last)

    def record(study, trial) -> None:
        error = trial.user_attrs.get("error")
        row = {"trial": trial.number, **{name: trial.params.get(name) for name in space},
               "valid_loss": trial.value, "valid_acc": trial.user_attrs.get("valid_acc"), "state": trial.state.name,
               "seconds": round(time.time() - trial.user_attrs.get("started", time.time()), 1), "error": error}
        with lock:
            state["trials"].append(row)
            state["running"].pop(str(trial.number), None)
            finished = [t for t in state["trials"] if t["state"] == "COMPLETE"]
            if finished:
                state["best"] = min(finished, key=lambda t: t["valid_loss"])
        atomic_write_json(out / RESULTS_FILE, {"params": params, "trials": state["trials"], "best": state.get("best")})
        ctx.log(f"trial {trial.number}: {trial.state.name} " + " ".join(f"{name} {row[name]}" for name in space)
                + f" valid_loss {row['valid_loss']}" + (f" ({error})" if error else ""))
        publish(force=True)
        if ctx.should_stop():
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", study_name=f"job{job.id}",
                                sampler=optuna.samplers.TPESampler(seed=int(params.get("seed") or 0)))
    # The first trial runs alone: in frozen mode it fills the feature cache that every later trial reads.
    first = 1 if parallel > 1 else n_trials
    study.optimize(_keeping_errors(objective), n_trials=first, catch=(Exception,), callbacks=[record])
    if n_trials > first and not ctx.should_stop():
        study.optimize(_keeping_errors(objective), n_trials=n_trials - first, n_jobs=parallel, catch=(Exception,),
                       callbacks=[record])
    if ctx.should_stop():
        raise Cancelled("the search was stopped")
    completed = [t for t in state["trials"] if t["state"] == "COMPLETE"]
    if not completed:
        errors = [t["error"] for t in state["trials"] if t.get("error")]
        raise jobs.JobError("every trial failed" + (f"; the first: {errors[0]}" if errors else ""))
    _keep_only_best(out, state["best"]["trial"])
    state["stage"], state["fraction"] = "done", 1.0
    publish(force=True)


def _keeping_errors(objective):
    """Optuna records a failed trial without its message: keep the message for the results table."""
    def wrapped(trial):
        try:
            return objective(trial)
        except Exception as exc:
            trial.set_user_attr("error", describe_error(exc))
            raise
    return wrapped


class _TrialProgress:
    """Per-trial on_progress: the trial's own curves, folded into the search's progress."""

    def __init__(self, number: int, state: dict, lock, publish):
        self.number, self.state, self.lock, self.publish = number, state, lock, publish
        self.speeds: dict = {}
        self.last: dict = {}

    def __call__(self, update: dict) -> None:
        self.last.update({k: v for k, v in update.items() if v is not None})
        stage = update.get("stage")
        if stage and update.get("images_per_s"):
            self.speeds[stage] = float(update["images_per_s"])
        with self.lock:
            self.state["running"][str(self.number)] = {
                k: update.get(k) for k in ("stage", "epoch", "epochs", "fraction", "train_loss", "valid_loss",
                                           "images_per_s", "data_wait_fraction", "device")}
            for key in ("images_per_s", "data_wait_fraction", "device"):
                if update.get(key) is not None:
                    self.state[key] = update[key]
        self.publish()


def _keep_only_best(out: Path, best_trial: int) -> None:
    """Trial models are only stepping stones: keep the best one's folder whole, the others' metrics only."""
    for folder in out.glob("trial-*"):
        if folder.name != f"trial-{best_trial:03d}":
            for name in ("model.pt", "checkpoint.pt"):
                (folder / name).unlink(missing_ok=True)


def trials_table(job: jobs.Job) -> pd.DataFrame:
    """The search's trials, best (lowest final valid loss) first; failed trials last."""
    trials = job.progress.get("trials")
    if trials is None and job.run_dir:
        try:
            trials = json.loads((Path(job.run_dir) / RESULTS_FILE).read_text()).get("trials")
        except (OSError, ValueError):
            trials = None
    frame = pd.DataFrame(trials or [], columns=["trial", *search_space(), "valid_loss", "valid_acc", "state",
                                                "seconds", "error"])
    return frame.sort_values("valid_loss", na_position="last", kind="stable").reset_index(drop=True)


def best_params(job: jobs.Job) -> dict | None:
    """Training params for the full run: the search's settings with the best trial's searched values."""
    table = trials_table(job)
    table = table[table["state"] == "COMPLETE"]
    if table.empty:
        return None
    best = table.iloc[0]
    params = {k: v for k, v in job.params.items() if k not in SEARCH_ONLY}
    types = {item.name: item.type for item in training_config.settings()}
    params.update({name: types[name](best[name]) for name in search_space()})
    params.update(epochs=int(job.params.get("full_epochs") or job.params.get("epochs") or 1),
                  from_search=job.id)
    if isinstance(best["valid_loss"], float) and math.isfinite(best["valid_loss"]):
        params["search_valid_loss"] = float(best["valid_loss"])
    return params
