"""TrainConfig is the one parameter contract: the CLI, the Train page, job params and the search derive from its
fields' metadata, so a new hyperparameter is one field; a balanced version's weighting is the default balance."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from streamlit.testing.v1 import AppTest

from core.cli import build_parser
from core.data.curation import balancing
from core.data.layouts.registry import load_dataset
from core.jobs import hpo, worker
from core.jobs import queue as jobs
from core.training import config as training
from core.training.config import TrainConfig, setting
from core.training.loop import train

PAGE = Path(__file__).resolve().parents[1] / "app_pages" / "train.py"
REQUIRED = ["--data", "some/data", "--out", "some/run"]


@dataclass
class WithDropout(TrainConfig):
    """TrainConfig with one more hyperparameter, added the way a real one would be: a field and its metadata."""

    dropout: float = setting(0.2, "dropout before the counting head", label="Dropout", step=0.05,
                             search={"uniform": (0.0, 0.5)})


@pytest.fixture
def with_dropout(monkeypatch):
    monkeypatch.setattr(training, "TrainConfig", WithDropout)
    return WithDropout


def parse_train(*args):
    return build_parser().parse_args(["train", *REQUIRED, *args])


def test_every_setting_is_a_train_option_with_its_default_and_choices(capsys):
    defaults = vars(parse_train())
    for item in training.settings():
        assert item.name in defaults, f"{item.name} has no `train` option"
        if item.name not in ("data", "out"):
            assert defaults[item.name] == item.default, item.name
        if item.type is bool:
            assert vars(parse_train(item.flag))[item.name] is (not item.default)
        elif item.choices:
            for choice in item.choices:
                assert vars(parse_train(item.flag, str(choice)))[item.name] == choice
            if not item.open_choices:
                with pytest.raises(SystemExit):
                    parse_train(item.flag, "no-such-choice")
        elif item.type in (int, float):
            assert vars(parse_train(item.flag, "3"))[item.name] == item.type(3)
    # the flags kept from before the options were generated
    assert parse_train("--workers", "0").num_workers == 0
    assert parse_train("--no-augment").augment is False and parse_train("--resume").resume is True
    assert parse_train("--device", "cuda:1").device == "cuda:1"  # validate() judges the GPU index
    # and `submit` carries the job's settings, but no run folder of its own
    submit = vars(build_parser().parse_args(["submit", "train", "--data", "d"]))
    assert {i.name for i in training.settings() if i.in_job} <= set(submit) and "out" not in submit
    capsys.readouterr()


def test_defaults_left_to_the_mode_resolve_in_the_config():
    frozen, finetune = TrainConfig(mode="frozen"), TrainConfig(mode="finetune")
    assert (frozen.n_epochs, frozen.learning_rate, frozen.input_height, frozen.test_views) == (40, 1e-4, 224, "none")
    assert (finetune.n_epochs, finetune.input_height, finetune.input_aspect, finetune.test_views) == (6, 288, 1.37, "flips")
    problems = TrainConfig(out="x", optimizer="sgd", head="deep", device="tpu").validate()
    assert "unknown optimizer 'sgd' (choose adamw or adam)" in problems
    assert "unknown head 'deep' (choose linear, normlinear or mlp)" in problems and any("device 'tpu'" in p for p in problems)


def test_job_params_round_trip():
    config = TrainConfig(data="d", out="o", mode="finetune", batch_size=16, lr=0.005, augment=False, balance="sampler")
    params = config.to_params()
    assert "out" not in params and "resume" not in params
    assert params["epochs"] == 6 and params["tta"] == "flips"  # mode defaults are written down
    back = TrainConfig.from_params({**params, "dataset_version": "abc", "n_train": 40}, "run", device="cuda:0")
    assert back.out == "run" and back.device == "cuda:0"
    assert back.to_dict() == config.to_dict() | {"out": "run", "device": "cuda:0"}
    assert "balance" not in TrainConfig(data="d").to_params()  # left to the dataset: resolved when training starts


def test_a_new_field_is_an_option_a_widget_a_job_param_and_searched(with_dropout, small_abid, monkeypatch):
    assert parse_train("--dropout", "0.4").dropout == 0.4 and parse_train().dropout == 0.2
    assert hpo.search_space() == training.search_space() == {
        "batch_size": {"choice": (16, 32, 64, 128, 256)}, "lr": {"log_uniform": (0.001, 0.1)},
        "dropout": {"uniform": (0.0, 0.5)}}
    picked = hpo.suggest(optuna.trial.FixedTrial({"lr": 0.01, "batch_size": 32, "dropout": 0.3}), hpo.search_space())
    assert picked == {"lr": 0.01, "batch_size": 32, "dropout": 0.3}

    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    monkeypatch.setattr(worker, "ensure_workers", lambda *a, **k: [])
    at = AppTest.from_file(str(PAGE), default_timeout=120).run()
    assert not at.exception and not at.error
    [advanced] = [block for block in at.expander if block.label == "Advanced"]
    assert {"train_dropout", "train_weight_decay", "train_patience"} <= {w.key for w in advanced.number_input}
    dropout = at.number_input(key="train_dropout")
    assert dropout.label == "Dropout" and dropout.value == 0.2
    assert at.checkbox(key="train_augment").value is True  # an existing advanced setting, drawn by its kind
    dropout.set_value(0.35)
    at.checkbox(key="train_augment").uncheck()
    at.selectbox(key="train_optimizer").set_value("adam").run()
    at.button(key="train_launch").click().run()
    [job] = jobs.list_jobs()
    assert (job.params["dropout"], job.params["augment"], job.params["optimizer"]) == (0.35, False, "adam")
    config = WithDropout.from_params(job.params, "run")
    assert (config.dropout, config.augment, config.optimizer) == (0.35, False, "adam")
    assert config.to_params()["dropout"] == 0.35


def test_the_search_space_is_the_metadatas():
    assert hpo.search_space() == {item.name: item.search for item in training.settings() if item.search}
    assert hpo.search_space() == {"batch_size": {"choice": (16, 32, 64, 128, 256)}, "lr": {"log_uniform": (0.001, 0.1)}}
    assert hpo.search_space(n_train=40)["batch_size"] == {"choice": (16, 32)}
    assert hpo.describe_space(hpo.search_space(40)) == "batch_size in {16, 32}, lr 0.001–0.1 (log-uniform)"


@pytest.mark.parametrize("strategy, expected", [("loss_weights", "weights"), ("sampler", "sampler")])
def test_a_balanced_version_trains_with_its_weighting_by_default(strategy, expected, small_abid, tmp_path, monkeypatch):
    dataset = load_dataset(small_abid)
    assert training.default_balance(dataset) == "weights"  # a plain folder: the loss is weighted
    version = balancing.apply(dataset, strategy, name=f"v-{strategy}")
    made = load_dataset(version.path)
    assert training.default_balance(made) == expected

    out = tmp_path / "run"
    result = train(TrainConfig(data=str(version.path), out=str(out), mode="frozen", epochs=1, image_size=96,
                               batch_size=8, num_workers=0))
    assert json.loads((out / "config.json").read_text())["balance"] == expected
    assert result["config"]["balance"] == expected

    # the Train page offers the same default for this dataset
    monkeypatch.setenv("BINSIGHT_DATA", str(version.path))
    monkeypatch.setattr(worker, "ensure_workers", lambda *a, **k: [])
    at = AppTest.from_file(str(PAGE), default_timeout=120).run()
    assert not at.exception and at.selectbox(key="train_balance").value == expected
