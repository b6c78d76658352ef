"""The one registry of runs: finished trainings, the run folders under runs/, and which model is current."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from core import config, db
from core.jobs.queue import JobError, _jsonable


@dataclass
class Run:
    id: str
    job_id: int | None
    path: str
    params: dict
    metrics: dict
    created: float
    extra: dict = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return Path(self.path) / "model.pt"

    @property
    def exists(self) -> bool:
        return self.model_path.is_file()


def register_run(path: str | Path, job_id: int | None = None, params: dict | None = None,
                 metrics: dict | None = None, extra: dict | None = None) -> Run:
    """Record a finished run folder (metrics default to its metrics.json); the first run becomes the current model."""
    path = Path(path)
    if metrics is None:
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
    if params is None:
        try:
            params = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            params = {}
    with db.connection() as conn:
        conn.execute(
            "INSERT OR REPLACE INTO runs (id, job_id, path, params, metrics, extra, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (path.name, job_id, str(path), json.dumps(params, default=_jsonable),
             json.dumps(metrics, default=_jsonable), json.dumps(extra or {}, default=_jsonable), time.time()))
    if current_run() is None:
        set_current_run(path.name)
    return get_run(path.name)


def _run(row) -> Run:
    return Run(id=row["id"], job_id=row["job_id"], path=row["path"], params=json.loads(row["params"] or "{}"),
               metrics=json.loads(row["metrics"] or "{}"), extra=json.loads(row["extra"] or "{}"),
               created=row["created"])


def get_run(run_id: str) -> Run:
    with db.connection() as conn:
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise JobError(f"there is no run {run_id!r}")
    return _run(row)


def list_runs() -> list[Run]:
    """Newest first, runs whose folder was deleted left out."""
    with db.connection() as conn:
        rows = conn.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
    return [run for run in map(_run, rows) if Path(run.path).is_dir()]


def set_current_run(run_id: str) -> Run:
    """Make `run_id` the model Predict uses; a run folder trained from the CLI under runs/ is registered first."""
    try:
        run = get_run(run_id)
    except JobError:
        folder = config.runs_dir() / run_id
        if not (folder / "model.pt").is_file():
            raise
        run = register_run(folder)
    if not run.exists:
        raise JobError(f"run {run_id!r} has no model file ({run.model_path})")
    config.save_settings(current_run=run_id)
    return run


def current_run() -> Run | None:
    """The model the Predict page uses, or None when none was chosen or its files are gone."""
    chosen = config.load_settings().get("current_run")
    if not chosen:
        return None
    try:
        run = get_run(chosen)
    except JobError:
        return None
    return run if run.exists else None


def final_test_metrics(metrics: dict) -> dict:
    """The final test metrics of a metrics.json (its "test" entry; a flat dict of metrics is taken as it is)."""
    return metrics["test"] if isinstance(metrics.get("test"), dict) else metrics


def final_metrics(run: Run) -> dict:
    """The run's final test metrics, wherever the training put them in metrics.json."""
    return final_test_metrics(run.metrics or {})


def read_run_metrics(run_dir: str | Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def current_model_path() -> Path | None:
    """model.pt of the run chosen as the current model, or None when there is none yet."""
    run = current_run()  # None when none was chosen or its files are gone
    return run.model_path if run is not None else None


def available_runs() -> list[dict]:
    """Runs with a model file, newest first: the registered ones and any other run folder under runs/.

    Each: {"id", "path", "created", "accuracy" (final test accuracy or None), "backbone", "mode"}.
    """
    found: dict[str, dict] = {}
    for run in list_runs():
        if run.exists:
            final = final_metrics(run)
            found[str(Path(run.path).resolve())] = _run_entry(run.id, Path(run.path), run.created, final, run.params,
                                                              run.extra.get("name"))
    for folder in config.runs_dir().iterdir():
        key = str(folder.resolve())
        if key in found or not (folder / "model.pt").is_file():
            continue
        metrics = _read_json(folder / "metrics.json")
        final = final_test_metrics(metrics)
        found[key] = _run_entry(folder.name, folder, (folder / "model.pt").stat().st_mtime, final,
                                _read_json(folder / "config.json"))
    return sorted(found.values(), key=lambda r: r["created"], reverse=True)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_entry(run_id: str, path: Path, created: float, final: dict, params: dict, name: str | None = None) -> dict:
    accuracy = final.get("accuracy") if isinstance(final, dict) else None
    return {"id": run_id, "path": str(path), "created": float(created),
            "accuracy": float(accuracy) if isinstance(accuracy, (int, float)) else None,
            "backbone": params.get("backbone"), "mode": params.get("mode"),
            "name": name or short_name(run_id, params)}


JOB_RUN_ID = re.compile(r"^\d{8}-\d{6}-.*-job(\d+)$")
MAX_NAME = 32


def short_backbone(name: str) -> str:
    """A backbone's name for tables and captions: "lite0" for efficientnet_lite0."""
    return str(name).replace("efficientnet_", "")


def backbones_label(params: dict) -> str:
    """A run's backbone, short: "lite0", or "lite0+lite2" for an ensemble on two."""
    return "+".join(short_backbone(b) for b in (params.get("backbone"), params.get("also_backbone")) if b)


def short_name(run_id: str, params: dict) -> str:
    """A run's default name, short enough for a table column: "#3 lite0 frozen 160px" for a job's run folder."""
    found = JOB_RUN_ID.match(run_id)
    if not found:
        return run_id if len(run_id) <= MAX_NAME else run_id[:MAX_NAME - 1] + "…"
    backbone = backbones_label(params)
    mode = "" if params.get("also_backbone") else params.get("mode") or ""  # two backbones: a partial ensemble
    members = f"×{params['ensemble']}" if (params.get("ensemble") or 1) > 1 else ""
    refit = "refit" if params.get("refit") else ""
    size = f"{params['image_size']}px" if params.get("image_size") else ""
    return " ".join(p for p in (f"#{found[1]}", backbone, mode, members, refit, size) if p)


def run_name(run: Run) -> str:
    """The name people gave the run, else its short default name."""
    return run.extra.get("name") or short_name(run.id, run.params)


def rename_run(run_id: str, name: str) -> Run:
    """Give a run a readable name (empty: back to its default); a CLI run folder is registered first."""
    name = " ".join(name.split())[:MAX_NAME]
    try:
        run = get_run(run_id)
    except JobError:
        run = register_run(config.runs_dir() / run_id)
    extra = {**run.extra, "name": name} if name else {k: v for k, v in run.extra.items() if k != "name"}
    with db.connection() as conn:
        conn.execute("UPDATE runs SET extra = ? WHERE id = ?", (json.dumps(extra, default=_jsonable), run_id))
    return get_run(run_id)


def run_label(run: dict) -> str:
    parts = [run.get("name") or run["id"]]
    if run.get("accuracy") is not None:
        parts.append(f"test accuracy {run['accuracy']:.1%}")
    return " · ".join(parts)
