"""`python -m core train | evaluate | predict`: the CLI contract, and exit code 2 with one line for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from tests.conftest import ROOT, make_abid_subset

TRAIN = ["--image-size", "96", "--epochs", "1", "--batch-size", "8", "--workers", "0"]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_abid_subset(tmp_path / "data", per_class=8)


def test_train_evaluate_predict(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "balanced accuracy" in out
    assert (run / "model.pt").is_file() and (run / "metrics.json").is_file()

    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(data), "--split", "all",
                 "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "support" in out
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert {"classes", "accuracy", "balanced_accuracy", "macro_f1", "mae", "off_by_one", "per_class",
            "confusion_matrix", "n", "skipped"} <= set(scores)
    assert scores["classes"] == [1, 2, 3, 4, 5] and scores["n"] == 40

    photos = sorted((data / "bin-images").glob("*.jpg"))
    assert main(["predict", "--model", str(run / "model.pt"), str(photos[0]), str(data / "bin-images"),
                 "--csv", str(tmp_path / "pred.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 1 + len(photos) and "p(5)" in lines[0]
    from core.models.inference import predict_photos
    from core.models.networks import load_model

    expected = predict_photos(*load_model(run / "model.pt"), [photos[0]], num_workers=0).iloc[0]
    assert lines[1].split()[:2] == [photos[0].name, str(int(expected["predicted"]))]
    assert len((tmp_path / "pred.csv").read_text().strip().splitlines()) == 1 + 1 + len(photos)


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/no/such/folder", "--out", "{tmp}/run"], "no such"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--epochs", "0"], "epochs"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--batch-size", "5000"], "larger than the training set"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--lr", "-1"], "learning rate"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/run"], "no bin photos"),
    (["evaluate", "--model", "{tmp}/none/model.pt", "--data", "{data}"], "no such model"),
    (["predict", "--model", "{tmp}/none/model.pt", "{data}"], "no such model"),
    (["predict", "--model", "{data}/labels.csv", "{tmp}/nothing.jpg"], "no such photo"),
    (["predict", "--model", "{data}/labels.csv", "{data}/bin-images"], "not a Binsight model"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, data, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_missing_resnet_weights_exit_2_without_traceback(data, tmp_path):
    env = {"BINSIGHT_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "core", "train", "--data", str(data), "--out", str(tmp_path / "run"),
                           "--backbone", "resnet50", *TRAIN], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "--weights" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
