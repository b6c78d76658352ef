"""Training in several real processes (torchrun, gloo on the CPU) on a few dozen real photos: identical weights on
every rank, the same result as one process with the same global batch, disjoint shares, two "machines" meeting at a
c10d rendezvous, cancel and a dying rank; and training from shards matching training from the folder."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.errors import Cancelled
from core.models.networks import load_model
from core.training import distributed
from core.training.config import TrainConfig, TrainingError
from core.training.loop import train

# Small and fast: a scratch CNN on 64-px photos, no augmentation (so one process and two see the same pixels),
# plain cross-entropy without class weights (a weighted mean per rank is not the global weighted mean).
SMALL = {"mode": "finetune", "backbone": "simple_cnn", "image_size": 64, "aspect": 1.0, "epochs": 1, "batch_size": 8,
         "num_workers": 0, "device": "cpu", "augment": False, "balance": "none", "loss": "ce", "tta": "none",
         "patience": 0}


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    monkeypatch.setenv("BINSIGHT_DIST_TIMEOUT_S", "60")  # read by each rank when it joins the process group


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_with_the_same_global_batch(small_abid, tmp_path, monkeypatch):
    dumps = tmp_path / "dumps"
    monkeypatch.setenv(distributed.TEST_DUMP_ENV, str(dumps))
    monkeypatch.setenv(distributed.TEST_NO_DROPOUT_ENV, "1")
    config = TrainConfig(data=str(small_abid), out=str(tmp_path / "two"), processes=2, lr=1e-3, **SMALL)
    states = []
    result = train(config, on_progress=states.append)
    ranks = [json.loads((dumps / f"rank{r}.json").read_text()) for r in (0, 1)]
    # DDP keeps the replicas identical
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # each rank trained on its own share; together they cover the train split (the sampler pads an odd split
    # with at most one repeated photo)
    seen = [set(r["seen"]) for r in ranks]
    from core.data.layouts.registry import load_dataset

    train_photos = {str(p) for p in load_dataset(small_abid).rows("train")["path"]}
    assert seen[0] | seen[1] == train_photos
    assert len(seen[0] & seen[1]) == len(train_photos) % 2 and len(ranks[0]["seen"]) == len(ranks[1]["seen"])
    written = json.loads((tmp_path / "two" / "config.json").read_text())
    assert written["world_size"] == 2 and written["global_batch_size"] == 16
    assert written["lr_scaling"] == {"rule": "linear", "base_lr": 1e-3, "factor": 2, "lr": 2e-3}
    # rank 0 alone wrote the run; its progress reached the caller through the run folder
    assert result["test"]["n"] > 0 and {"train", "done"} <= {s["stage"] for s in states}
    assert "[rank 1]" in (tmp_path / "two" / "torchrun.log").read_text()
    assert "[rank" not in (tmp_path / "two" / "log.txt").read_text()
    # every valid and test photo was scored exactly once
    one = train(replace(config, out=str(tmp_path / "one"), processes=1, batch_size=16, lr=2e-3))
    assert result["valid"]["n"] == one["valid"]["n"] and result["test"]["n"] == one["test"]["n"]
    # the same photos per step and the same lr: the same training, up to BatchNorm's statistics over half batches
    assert result["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=0.05)
    assert result["valid"]["accuracy"] == pytest.approx(one["valid"]["accuracy"], abs=0.15)
    two_model, one_model = (load_model(tmp_path / run / "model.pt")[0] for run in ("two", "one"))
    start = initial_weights(config, one_model)
    two_update, one_update = (torch.cat([(p - start[n]).flatten() for n, p in params(m).items()])
                              for m in (two_model, one_model))
    # Adam's early steps are about ±lr a weight, so BatchNorm's half-batch statistics flip the sign of weak
    # gradients: the directions agree well above chance (0) and the step sizes agree (the lr scaled with the batch).
    cosine = torch.nn.functional.cosine_similarity(two_update, one_update, dim=0).item()
    print("update cosine", cosine, "norms", two_update.norm().item(), one_update.norm().item())
    assert cosine > 0.4
    assert two_update.norm().item() == pytest.approx(one_update.norm().item(), rel=0.1)


def initial_weights(config, like) -> dict[str, torch.Tensor]:
    """The seeded weights both runs started from, built as the training builds them."""
    from core.models import networks
    from core.training.epochs import seed_everything

    seed_everything(config.seed)
    backbone, info = networks.build_backbone(config.backbone, config.weights)
    n_classes = like.head.state_dict()[list(like.head.state_dict())[-1]].shape[0]
    model = networks.CountingModel(backbone, networks.make_head(config.head, info["feature_dim"], n_classes,
                                                                config.backbone))
    return params(model)


def test_two_processes_keep_one_weight_average(small_abid, tmp_path, monkeypatch):
    dumps = tmp_path / "dumps"
    monkeypatch.setenv(distributed.TEST_DUMP_ENV, str(dumps))
    config = TrainConfig(data=str(small_abid), out=str(tmp_path / "run"), processes=2, ema=0.5, **SMALL | {"epochs": 1})
    result = train(config)
    # the kept weights are the average, and its batch-norm statistics agree across ranks as the weights do
    ranks = [json.loads((dumps / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert "valid_loss_trained" in result["history"][0]


def test_two_machines_meet_at_a_c10d_rendezvous(small_abid, tmp_path):
    rdzv = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "core", "train", "--data", str(small_abid), "--out", str(tmp_path / "run"),
               "--mode", "finetune", "--backbone", "simple_cnn", "--image-size", "64", "--epochs", "1",
               "--batch-size", "8", "--workers", "0", "--device", "cpu", "--balance", "none", "--tta", "none",
               "--nnodes", "2", "--rendezvous", rdzv]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["world_size"] == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["n"] > 0


def test_cancel_stops_every_rank_at_the_same_step(small_abid, tmp_path):
    config = TrainConfig(data=str(small_abid), out=str(tmp_path / "run"), processes=2, **SMALL | {"epochs": 3})
    states = []
    with pytest.raises(Cancelled):
        train(config, on_progress=states.append, should_stop=lambda: any(s["stage"] == "train" for s in states))
    log = (tmp_path / "run" / "torchrun.log").read_text()
    rank0 = (tmp_path / "run" / "log.txt").read_text().split("stopped on request at ")[1].split("\n")[0]
    rank1 = log.split("[rank 1] stopped on request at ")[1].split("\n")[0]
    assert rank0 == rank1 and not (tmp_path / "run" / "metrics.json").exists()


def test_a_rank_that_dies_fails_the_run_with_its_log(small_abid, tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.TEST_KILL_ENV, "1")
    config = TrainConfig(data=str(small_abid), out=str(tmp_path / "run"), processes=2, **SMALL)
    with pytest.raises(TrainingError, match="a training process failed") as failure:
        train(config)
    # torchrun's report names the rank that died and how; the message points at the whole log
    assert "torchrun.log" in str(failure.value) and "SIGKILL" in str(failure.value)


def test_settings_that_do_not_distribute_are_refused_with_the_reason(tmp_path):
    config = TrainConfig(data="x", out=str(tmp_path), processes=2, mode="frozen")
    assert any("frozen mode" in p for p in config.validate())
    assert any("balanced sampler" in p for p in replace(config, mode="finetune", balance="sampler").validate())
    assert any("--rendezvous" in p for p in replace(config, mode="finetune", nnodes=2).validate())


def test_training_from_shards_matches_training_from_the_folder(small_abid, tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.TEST_NO_DROPOUT_ENV, "1")  # dropout masks follow the order photos arrive in
    from core.data.layouts.registry import load_dataset
    from core.data.remote.shards import pack_shards

    pack_shards(load_dataset(small_abid), tmp_path / "shards", shard_size="100kB")
    n_train = len(load_dataset(small_abid).rows("train"))
    # one full batch a step: the order the photos arrive in (shards or sampler) cannot matter
    settings = SMALL | {"epochs": 2, "batch_size": n_train}
    folder = train(TrainConfig(data=str(small_abid), out=str(tmp_path / "folder"), **settings))
    shards = train(TrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "from_shards"), **settings))
    assert shards["test"]["n"] == folder["test"]["n"] > 0 and shards["valid"]["n"] == folder["valid"]["n"]
    for a, b in zip(folder["history"], shards["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
    folder_model, shard_model = (load_model(tmp_path / run / "model.pt")[0] for run in ("folder", "from_shards"))
    for (name, a), b in zip(folder_model.state_dict().items(), shard_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name


def test_a_job_of_two_processes_runs_under_torchrun_and_follows_rank_0s_progress(small_abid):
    from core.data.layouts.registry import load_dataset
    from core.jobs import queue as jobs
    from core.jobs import runners
    from core.jobs.params import describe_dataset

    params = describe_dataset(load_dataset(small_abid)) | TrainConfig(**SMALL, processes=2).to_params()
    job = jobs.submit("train", params | {"data": str(small_abid)})
    claimed = jobs.claim_next("cpu", ["cpu", "auto"], "w1", 4242)
    assert runners.run_job(claimed, "cpu") == "done"
    finished = jobs.get(job.id)
    assert finished.progress["stage"] == "done" and finished.progress["fraction"] == 1.0
    assert json.loads((Path(finished.run_dir) / "config.json").read_text())["world_size"] == 2
