"""The job queue, the runs registry and the in-process job runner: lifecycle, slots, cancel, bad input, estimates."""

import pytest

from core import config
from core.data.layouts.registry import load_dataset
from core.jobs import hpo, runners
from core.jobs import queue as jobs
from core.jobs.estimates import estimate_seconds
from core.jobs.params import describe_dataset, training_problems
from core.jobs.runs import current_run, final_metrics, get_run, list_runs, register_run, set_current_run


def fake_run(name: str, balanced_accuracy: float) -> str:
    """A run folder as training leaves it (model file, metrics.json), under runs/."""
    folder = config.runs_dir() / name
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "metrics.json").write_text(f'{{"test": {{"balanced_accuracy": {balanced_accuracy}, "accuracy": 0.5}}}}')
    return str(folder)


def training_params(data, **changes) -> dict:
    facts = describe_dataset(load_dataset(data))
    return {**facts, "backbone": "efficientnet_lite0", "mode": "frozen", "epochs": 1, "batch_size": 16, "lr": 0.01,
            "image_size": 96, "balance": "none", "device": "cpu"} | changes


def test_queue_lifecycle_is_persisted_and_oldest_first():
    first = jobs.submit("sleep", {"seconds": 1})
    second = jobs.submit("sleep", {"seconds": 2, "device": "cpu"})
    assert [j.status for j in (first, second)] == ["queued", "queued"]
    assert jobs.queue_position(second.id) == 2
    assert first.log_path.endswith(f"job{first.id}.log") and first.run_dir is None

    claimed = jobs.claim_next("cpu", ["cpu", "auto"], "w1", 4242)
    assert claimed.id == first.id and claimed.status == "running" and claimed.pid == 4242 and claimed.slot == "cpu"
    jobs.set_progress(first.id, {"fraction": 0.5, "stage": "sleep"})
    assert jobs.get(first.id).progress == {"fraction": 0.5, "stage": "sleep"}
    assert jobs.finish(first.id, "done")
    assert not jobs.finish(first.id, "failed", "late")  # a finished job keeps its outcome
    assert jobs.get(first.id).status == "done" and jobs.get(first.id).finished >= jobs.get(first.id).started

    assert jobs.queue_position(second.id) == 1
    assert [j.id for j in jobs.list_jobs(["queued"])] == [second.id]
    assert [j.id for j in jobs.list_jobs()] == [second.id, first.id]  # newest first


def test_slots_take_only_the_jobs_meant_for_them():
    assert jobs.slot_accepts("cpu", ["cpu"]) == ["cpu", "auto"]
    assert jobs.slot_accepts("cpu", ["cuda:0", "cpu"]) == ["cpu"]  # with a GPU, 'auto' jobs go to the GPU
    assert set(jobs.slot_accepts("cuda:1", ["cuda:0", "cuda:1", "cpu"])) == {"auto", "cuda", "cuda:1"}
    on_gpu = jobs.submit("sleep", {"device": "cuda"})
    assert jobs.claim_next("cpu", ["cpu", "auto"], "w", 1) is None
    assert jobs.claim_next("cuda:0", ["auto", "cuda", "cuda:0"], "w", 1).id == on_gpu.id


def test_cancel_a_queued_job_at_once_and_a_running_one_by_flag():
    queued = jobs.submit("sleep", {"seconds": 1})
    running = jobs.submit("sleep", {"seconds": 1})
    assert jobs.cancel(queued.id).status == "cancelled"
    jobs.claim_next("cpu", ["cpu", "auto"], "w", 1)  # the cancelled one is skipped
    assert jobs.get(running.id).status == "running" and not jobs.cancel_requested(running.id)
    assert jobs.cancel(running.id).status == "running" and jobs.cancel_requested(running.id)
    with pytest.raises(jobs.JobError, match="no job 999"):
        jobs.cancel(999)


def test_bad_submissions_are_refused_with_the_reason():
    with pytest.raises(jobs.JobError, match="unknown job kind"):
        jobs.submit("mine_bitcoin", {})
    with pytest.raises(jobs.JobError, match="device 'tpu'"):
        jobs.submit("sleep", {"device": "tpu"})
    assert jobs.list_jobs() == []


def test_impossible_training_parameters_get_reasons(small_abid):
    params = training_params(small_abid)
    n_train = params["n_train"]
    assert training_problems(params, n_train, cuda_available=False) == []
    reasons = training_problems(params | {"epochs": 0, "lr": -0.1, "batch_size": n_train + 1}, n_train, False)
    text = " ".join(reasons)
    assert "epochs must be at least 1" in text and "learning rate must be positive" in text
    assert f"larger than the training set ({n_train} photos)" in text
    assert any("no usable GPU" in r for r in training_problems(params | {"device": "cuda"}, n_train, False))


def test_runs_registry_and_the_current_model_survive_a_restart():
    assert current_run() is None
    first = register_run(fake_run("run-a", 0.4), job_id=1, params={"mode": "frozen"})
    assert current_run().id == first.id  # the first run becomes current
    register_run(fake_run("run-b", 0.6), job_id=2)
    assert final_metrics(get_run("run-b"))["balanced_accuracy"] == 0.6
    set_current_run("run-b")
    assert current_run().id == "run-b"  # read back from disk, as a new process would
    assert [r.id for r in list_runs()] == ["run-b", "run-a"]

    cli_run = fake_run("trained-from-cli", 0.5)  # never registered: `python -m core train --out runs/...`
    assert set_current_run("trained-from-cli").path == cli_run
    with pytest.raises(jobs.JobError, match="no run 'nowhere'"):
        set_current_run("nowhere")

    (config.runs_dir() / "trained-from-cli" / "model.pt").unlink()
    assert current_run() is None  # its model is gone: Predict must not use it


def test_estimate_uses_measured_speed_once_a_run_exists():
    params = {"backbone": "efficientnet_lite0", "mode": "finetune", "epochs": 2, "image_size": 224, "aspect": 1.0}
    guess, measured = estimate_seconds(params, 400, 100, 100, on_gpu=False)
    from core.jobs.estimates import DEFAULT_SPEED

    # no run yet: the default speeds at 224², two epochs, then valid and test in four mirror views
    assert not measured and guess == pytest.approx(2 * (400 / DEFAULT_SPEED["train"] + 100 / DEFAULT_SPEED["features"])
                                                   + 4 * (100 + 100) / DEFAULT_SPEED["features"])
    register_run(fake_run("fast", 0.5), params=params,
                      extra={"speeds": {"train": 100.0, "features": 300.0}, "on_gpu": False})
    two, measured = estimate_seconds(params, 400, 100, 100, on_gpu=False)
    four, _ = estimate_seconds(params | {"epochs": 4}, 400, 100, 100, on_gpu=False)
    # two epochs of training and validation, then valid and test scored in four mirror views
    assert measured and two == pytest.approx(2 * (400 / 100 + 100 / 300) + 4 * (100 + 100) / 300)
    assert four - two == pytest.approx(2 * (400 / 100 + 100 / 300))  # each epoch more costs one epoch
    # a speed measured at 224² scales with the input's pixels: the bins' shape at 288 px costs 2.26× as much
    bigger, _ = estimate_seconds(params | {"image_size": 288, "aspect": 1.37}, 400, 100, 100, on_gpu=False)
    assert bigger == pytest.approx(two * 288 ** 2 * 1.37 / 224 ** 2)
    assert estimate_seconds(params, 400, 100, 100, on_gpu=True)[1] is False  # GPU speed not measured yet


def test_the_estimate_of_a_partial_training_counts_the_store_pass_in_photos_per_second():
    """A partial run measures the stage maps' pass in photos/s, both stored views of a photo at once: on an empty
    store the estimate spends the photos / that speed on it, not twice as long."""
    params = {"backbone": "efficientnet_lite0", "mode": "partial", "epochs": 8, "image_size": 224, "aspect": 1.0}
    for name, photos_per_s in (("slow-maps", 20.0), ("fast-maps", 40.0)):
        register_run(fake_run(name, 0.5), params=params,
                     extra={"speeds": {"features": photos_per_s, "train": 150.0}, "on_gpu": False})
        seconds, measured = estimate_seconds(params, 400, 100, 100, on_gpu=False)
        assert measured
        if name == "slow-maps":
            slow = seconds
    assert slow - seconds == pytest.approx(600 / 20.0 - 600 / 40.0)


def test_a_speed_a_run_did_not_measure_is_guessed_for_the_photos_size():
    """A frozen run whose features were read back measured its head only: its features speed is then the guess,
    scaled to the photos' size like every guess (not the 224² figure at any size)."""
    from core.jobs.estimates import DEFAULT_SPEED

    params = {"backbone": "efficientnet_lite0", "mode": "frozen", "epochs": 5, "image_size": 288, "aspect": 1.37,
              "tta": "none"}
    register_run(fake_run("head-only", 0.5), params=params, extra={"speeds": {"train": 8000.0}, "on_gpu": False})
    seconds, measured = estimate_seconds(params, 400, 100, 100, on_gpu=False)
    features = DEFAULT_SPEED["features"] * 224 ** 2 / (288 ** 2 * 1.37)
    assert measured and seconds == pytest.approx(600 / features + 5 * 500 / 8000.0)


def test_a_dataset_gone_at_run_time_fails_the_job_with_a_clear_message(small_abid):
    import shutil

    job = jobs.submit("train", training_params(small_abid))
    shutil.rmtree(small_abid)
    claimed = jobs.claim_next("cpu", ["cpu", "auto"], "w", 1)
    assert runners.run_job(claimed, "cpu") == "failed"
    failed = jobs.get(job.id)
    assert failed.status == "failed" and f"The dataset {small_abid} is gone" in failed.error
    assert "is gone" in failed.log_tail()


def test_cancel_stops_a_real_training_through_should_stop(small_abid, monkeypatch):
    job = jobs.submit("train", training_params(small_abid, epochs=50))
    claimed = jobs.claim_next("cpu", ["cpu", "auto"], "w", 1)
    real_set_progress = jobs.set_progress

    def cancel_once_features_are_computed(job_id, progress):  # the user clicks Cancel while training runs
        real_set_progress(job_id, progress)
        if progress.get("stage") == "features":
            jobs.cancel(job_id)

    monkeypatch.setattr(jobs, "set_progress", cancel_once_features_are_computed)
    assert runners.run_job(claimed, "cpu") == "cancelled"
    assert jobs.get(job.id).error == "cancelled while running" and list_runs() == []
    assert "features" in jobs.get(job.id).log_tail()  # the flag was read inside core.training.loop.train


def test_search_space_follows_the_study_and_the_machine():
    assert hpo.batch_choices(40) == [16, 32]
    assert hpo.batch_choices(10_000) == [16, 32, 64, 128, 256]
    assert hpo.batch_choices(8) == [16]  # smaller than every choice: training refuses it with the reason
    assert hpo.parallel_trials(4, "cpu", cores=2) == (1, "2 CPU cores allow 1 at a time")
    assert hpo.parallel_trials(4, "cpu", cores=16) == (4, "")
    assert hpo.parallel_trials(8, "cuda:0")[0] == 4
    assert hpo.final_valid_loss({"history": [{"valid_loss": 2.0}, {"valid_loss": 1.5}]}, {}) == 1.5
    with pytest.raises(ValueError, match="no valid loss"):
        hpo.final_valid_loss({"history": []}, {})


def test_cli_submits_lists_and_cancels(small_abid, capsys):
    from core.cli import main

    assert main(["submit", "sleep", "--seconds", "1", "--no-start"]) == 0
    assert main(["submit", "train", "--data", str(small_abid), "--mode", "frozen", "--epochs", "1",
                 "--batch-size", "16", "--image-size", "96", "--no-start"]) == 0
    queued = jobs.list_jobs()
    assert [j.kind for j in queued] == ["train", "sleep"]
    assert queued[0].params["data"] == str(small_abid) and queued[0].params["n_train"] == 40
    assert main(["cancel", str(queued[1].id)]) == 0
    capsys.readouterr()
    assert main(["jobs"]) == 0
    listing = capsys.readouterr().out
    assert "train  queued" in listing and "sleep  cancelled" in listing

    assert main(["submit", "train", "--data", str(small_abid), "--epochs", "0", "--no-start"]) == 2
    assert "epochs must be at least 1" in capsys.readouterr().err
    assert main(["submit", "hpo", "--no-start"]) == 2
    assert main(["cancel", "999"]) == 2
    assert len(jobs.list_jobs()) == 2  # nothing queued by the refused commands


def test_device_facts_without_a_gpu():
    from core import gpu

    if gpu.cuda_available():
        pytest.skip("this machine has a GPU")
    facts = gpu.describe()
    assert facts["cuda"] is False and facts["gpus"] == [] and facts["cpu_cores"] >= 1
    assert gpu.training_slots() == ["cpu", "remote"] and gpu.stats_for_device("cpu") is None
    assert gpu.stats_for_device("cuda:0") is None


def test_the_estimate_of_a_frozen_training_reads_cached_features_instead_of_computing_them():
    from core.jobs.estimates import CACHED_READ_SPEED, DEFAULT_SPEED, features_cached

    params = {"backbone": "efficientnet_lite0", "mode": "frozen", "epochs": 5, "image_size": 224, "aspect": 1.0,
              "dataset_key": "abid", "tta": "none"}
    first, _ = estimate_seconds(params, 400, 100, 100, on_gpu=False)
    assert not features_cached(params)
    register_run(fake_run("frozen-before", 0.5), params=params, extra={"speeds": {}, "on_gpu": False})
    assert features_cached(params) and features_cached(params | {"epochs": 20})  # epochs do not change features
    again, _ = estimate_seconds(params, 400, 100, 100, on_gpu=False)
    assert first - again == pytest.approx(600 / DEFAULT_SPEED["features"] - 600 / CACHED_READ_SPEED)
    # another input size, dataset or mode computes its own features
    assert not features_cached(params | {"image_size": 288})
    assert not features_cached(params | {"dataset_key": "other"})
    assert not features_cached(params | {"mode": "finetune"})
