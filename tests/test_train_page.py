"""The Train page through AppTest: the form refuses impossible settings, Launch queues, the live view, runs and the
current model, and the hyperparameter search with its one-click full training."""
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import config
from core.data.layouts.registry import load_dataset
from core.jobs import hpo, runners, worker
from core.jobs import queue as jobs
from core.jobs.context import JobContext
from core.jobs.params import describe_dataset
from core.jobs.runs import current_run, register_run

PAGE = Path(__file__).resolve().parents[1] / "app_pages" / "train.py"


@pytest.fixture(autouse=True)
def dataset(small_abid, monkeypatch):
    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    return small_abid


@pytest.fixture
def started(monkeypatch) -> list:
    """Worker starts the page asks for, recorded instead of spawning processes (the restart tests spawn real ones)."""
    calls = []
    monkeypatch.setattr(worker, "ensure_workers", lambda *a, **k: calls.append(1) or [])
    return calls


def page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=120).run()


def text_of(at: AppTest, *kinds) -> str:
    return "\n".join(str(e.value) for kind in kinds or ("markdown", "error", "caption", "success", "warning", "code")
                     for e in at.get(kind))


def claim_as_worker(job: jobs.Job):
    """Take the job as a worker in this process does: hold the CPU slot, mark it running under this pid."""
    lock = worker.SlotLock("cpu")
    assert lock.acquire()
    return lock, jobs.claim_next("cpu", ["cpu", "auto"], "test-worker", os.getpid())


def test_the_form_refuses_impossible_settings_with_the_reason(started):
    at = page()
    assert not at.exception and not at.error
    assert "Estimated duration: about" in text_of(at, "caption")
    at.number_input(key="train_epochs_frozen").set_value(0)
    at.number_input(key="train_lr_frozen").set_value(-0.01)
    at.number_input(key="train_batch").set_value(1000).run()
    reasons = text_of(at, "error")
    assert "epochs must be at least 1 (got 0)" in reasons and "the learning rate must be positive" in reasons
    assert "the batch size (1000) is larger than the training set (40 photos)" in reasons
    assert at.button(key="train_launch").disabled  # a browser cannot click it (AppTest refuses too)
    at.number_input(key="train_epochs_frozen").set_value(2)
    at.number_input(key="train_lr_frozen").set_value(0.01)
    at.number_input(key="train_batch").set_value(16).run()
    assert not at.error and not at.button(key="train_launch").disabled
    assert jobs.list_jobs() == []


def test_switching_mode_brings_that_modes_defaults_everywhere_in_the_form(started):
    at = page()
    assert at.number_input(key="hpo_full_epochs_frozen").value == 40
    at.radio(key="train_mode").set_value("finetune").run()
    assert at.number_input(key="train_epochs_finetune").value == 6
    assert (at.selectbox(key="train_size_finetune").value, at.selectbox(key="train_aspect_finetune").value,
            at.selectbox(key="train_tta_finetune").value) == (288, 1.37, "flips")
    # the search's full training follows the mode too, instead of keeping frozen mode's 40 epochs
    assert at.number_input(key="hpo_full_epochs_finetune").value == 6
    assert at.number_input(key="hpo_epochs_finetune").value == 3


def test_launch_queues_the_chosen_settings_and_a_queued_job_can_be_cancelled(started, dataset):
    at = page()
    at.radio(key="train_mode").set_value("finetune").run()
    at.number_input(key="train_epochs_finetune").set_value(3)
    at.number_input(key="train_batch").set_value(16)
    at.number_input(key="train_lr_finetune").set_value(0.005)
    at.selectbox(key="train_size_finetune").set_value(128)
    at.selectbox(key="train_balance").set_value("sampler").run()
    at.button(key="train_launch").click().run()
    assert not at.exception
    [job] = jobs.list_jobs()
    version = describe_dataset(load_dataset(dataset))["dataset_version"]
    assert job.status == "queued" and job.kind == "train" and started
    assert {k: job.params[k] for k in ("data", "dataset_version", "mode", "epochs", "batch_size", "lr", "image_size",
                                       "aspect", "tta", "balance", "n_train")} == {
        "data": str(dataset), "dataset_version": version, "mode": "finetune", "epochs": 3, "batch_size": 16,
        "lr": 0.005, "image_size": 128, "aspect": 1.37, "tta": "flips", "balance": "sampler", "n_train": 40}
    assert "number 1 in the queue" in text_of(at, "caption")
    at.button(key=f"train_cancel_{job.id}").click().run()
    assert jobs.get(job.id).status == "cancelled"
    assert f"Job {job.id}** · train · cancelled" in text_of(at, "markdown")


def test_a_running_training_shows_progress_curves_speed_and_device(started, dataset):
    facts = describe_dataset(load_dataset(dataset))
    job = jobs.submit("train", {**facts, "mode": "frozen", "epochs": 3, "batch_size": 16, "lr": 0.01,
                                "image_size": 96, "balance": "none"})
    lock, claimed = claim_as_worker(job)
    try:
        runners.run_training(JobContext(claimed, "cpu"))  # real training; the job stays 'running' until finish
        at = page()
        assert not at.exception
        assert f"Job {job.id}** · train · running" in text_of(at, "markdown")
        [bar] = at.get("progress")
        shown = {m.label: m.value for m in at.metric}
        assert shown["Epoch"] == "3/3" and float(shown["Images/s"].replace(",", "")) > 0
        assert "Device **cpu** · waiting on data **" in text_of(at, "caption")
        charts = [c.proto.spec for c in at.get("plotly_chart")]
        assert any('"valid loss"' in spec and '"train accuracy"' in spec for spec in charts)  # live curves
        assert "train · epoch 3/3 · train_loss" in text_of(at, "code")  # the log tail
    finally:
        lock.release()
    assert jobs.finish(job.id, "done")
    at = page()  # finished: now a run with its metrics, and the current model
    run = current_run()
    assert run.job_id == job.id and run.id in at.dataframe[0].value["run"].tolist()
    assert any("Test accuracy per run" in c.proto.spec for c in at.get("plotly_chart"))
    # the just-finished job stays at the top with its test figures and the way on to Evaluate
    test = run.metrics["test"]
    done = next(s.value for s in at.success if "Done in" in s.value)
    assert f"Test accuracy **{test['accuracy']:.1%}**" in done and f"**{test['off_by_one']:.1%}**" in done
    assert "3 epochs" in done
    at.button(key=f"train_to_evaluate_{job.id}").click().run()
    assert at.session_state["evaluate_open_run"] == run.id  # Evaluate opens on this job's run


def test_choosing_the_current_model(started):
    for name in ("run-old", "run-new"):
        folder = config.runs_dir() / name
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"weights")
        register_run(folder, params={"backbone": "efficientnet_lite0", "mode": "frozen"},
                          metrics={"test": {"balanced_accuracy": 0.4 if name == "run-old" else 0.6}})
    at = page()
    assert "**run-old** is the current model." in text_of(at, "caption")  # the first run registered
    at.selectbox(key="train_current").set_value("run-new").run()
    at.button(key="train_set_current").click().run()
    assert current_run().id == "run-new"
    assert "**run-new** is the current model." in text_of(at, "caption")
    # a run renamed keeps its folder; the pages show the new name
    from core.jobs.runs import available_runs, rename_run, run_label

    at.selectbox(key="train_rename_run").set_value("run-new").run()
    at.text_input(key="train_rename_run-new").input("  lite0   frozen, more epochs ")
    at.button(key="train_rename_apply").click().run()
    assert "**lite0 frozen, more epochs** is the current model." in text_of(at, "caption")
    assert "lite0 frozen, more epochs" in at.dataframe[0].value["name"].tolist()
    entry = next(r for r in available_runs() if r["id"] == "run-new")
    assert run_label(entry).startswith("lite0 frozen, more epochs")
    rename_run("run-new", "")
    assert next(r for r in available_runs() if r["id"] == "run-new")["name"] == "run-new"


def test_a_search_shows_its_trials_best_first_and_launches_the_full_training(started, dataset):
    facts = describe_dataset(load_dataset(dataset))
    search = jobs.submit("hpo", {**facts, "mode": "frozen", "epochs": 2, "image_size": 96, "balance": "none",
                                 "n_trials": 2, "parallel": 2, "full_epochs": 7})
    lock, claimed = claim_as_worker(search)
    try:
        assert runners.run_job(claimed, "cpu") == "done", jobs.get(search.id).error
    finally:
        lock.release()
    done = jobs.get(search.id)
    table = hpo.trials_table(done)
    assert len(table) == 2 and (table["state"] == "COMPLETE").all()
    assert table["valid_loss"].is_monotonic_increasing
    assert table["lr"].between(0.001, 0.1).all() and set(table["batch_size"]) <= {16, 32}
    assert done.progress["parallel"] == hpo.parallel_trials(2, "cpu")[0]  # two asked for; as many as the cores allow
    best = int(table.iloc[0]["trial"])
    kept = {p.parent.name for p in Path(done.run_dir).glob("trial-*/model.pt")}
    assert kept == {f"trial-{best:03d}"}

    at = page()
    assert not at.exception
    assert any("Trials: lower is better" in c.proto.spec for c in at.get("plotly_chart"))
    at.button(key=f"train_best_{search.id}").click().run()
    [full] = jobs.list_jobs(kind="train")
    assert full.status == "queued" and full.params["from_search"] == search.id
    assert full.params["lr"] == pytest.approx(table.iloc[0]["lr"])
    assert full.params["batch_size"] == table.iloc[0]["batch_size"] and full.params["epochs"] == 7
    assert "n_trials" not in full.params and full.params["data"] == str(dataset)


def test_a_search_launched_from_the_page_can_be_cancelled_there(started):
    at = page()
    at.number_input(key="hpo_trials").set_value(3).run()
    at.button(key="hpo_launch").click().run()
    assert not at.exception
    [search] = jobs.list_jobs(kind="hpo")
    assert search.status == "queued" and search.params["n_trials"] == 3 and started  # a worker was asked for
    at.button(key=f"train_cancel_{search.id}").click().run()
    assert not at.exception
    cancelled = jobs.get(search.id)
    assert cancelled.status == "cancelled" and cancelled.error == "cancelled before it started"
    assert hpo.best_params(cancelled) is None  # no trial, so nothing to train with


def test_the_partial_mode_is_offered_by_name_and_its_launched_job_trains(started, dataset, tmp_path):
    from core.training.config import TrainConfig
    from core.training.loop import train

    at = page()
    assert "fine-tune the last stages (fast on a CPU)" in at.radio(key="train_mode").options
    at.radio(key="train_mode").set_value("partial").run()
    assert (at.selectbox(key="train_size_partial").value, at.selectbox(key="train_aspect_partial").value,
            at.selectbox(key="train_tta_partial").value) == (288, 1.37, "hflip")
    at.number_input(key="train_epochs_partial").set_value(1)
    at.number_input(key="train_batch").set_value(16)
    at.selectbox(key="train_size_partial").set_value(128).run()
    assert not at.error
    at.button(key="train_launch").click().run()
    [job] = jobs.list_jobs()
    config = TrainConfig.from_params(job.params | {"num_workers": 0}, tmp_path / "run")
    assert job.params["mode"] == "partial" and config.cut == "blocks.5"
    result = train(config)
    assert result["mode"] == "partial" and result["test"]["n"] > 0


def test_a_refit_ensemble_of_two_backbones_is_chosen_in_advanced_and_launched(started, dataset, tmp_path):
    from core.training.config import TrainConfig

    at = page()
    at.radio(key="train_mode").set_value("partial").run()
    second = at.selectbox(key="train_also_backbone")
    assert second.value is None and "efficientnet_lite2" in second.options and "none" in second.options
    second.set_value("efficientnet_lite2")
    at.checkbox(key="train_refit").check()
    at.number_input(key="train_ensemble").set_value(2).run()
    assert not at.error
    at.button(key="train_launch").click().run()
    [job] = jobs.list_jobs()
    config = TrainConfig.from_params(job.params | {"num_workers": 0}, tmp_path / "run")
    assert (config.member_backbones, config.refit, config.ensemble) == (
        ["efficientnet_lite0", "efficientnet_lite2"], True, 2)
    # The job's card says what it trains: ten models are not mistaken for one.
    assert any("ensemble of 2 + 2 on efficientnet_lite2 · refit on train and valid" in m.value for m in at.markdown)
    from core.jobs.runs import short_name

    assert short_name(f"20261207-163710-efficientnet_lite0-partial-job{job.id}", job.params) == \
        f"#{job.id} lite0+lite2 ×2 refit 288px"
