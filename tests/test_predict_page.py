"""The Predict page through AppTest on a real small run: uploads with bad files, folders, S3, the quick training."""
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core import config
from core.data.photos import uploads
from core.jobs import queue as jobs
from core.jobs.runs import current_run
from core.models.inference import CLOSE_CALL, predict_inputs, predict_photos
from core.models.networks import load_model
from tests.moto_s3 import shared_world
from tests.test_uploads import BAD_FILES

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "predict.py")


def run_page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120).run()


def shown_metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def batch_table(at: AppTest) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if "low_confidence" in d.value.columns)


def photos(shared, n: int) -> list[Path]:
    return sorted((shared["data"] / "bin-images").glob("*.jpg"))[:n]


def expected_predictions(shared, run: str, paths) -> pd.DataFrame:
    model, meta = load_model(shared["runs"][run] / "model.pt")
    return predict_photos(model, meta, [str(p) for p in paths])


def test_without_a_model_one_click_queues_a_quick_frozen_training(monkeypatch, small_abid):
    import core.jobs.worker

    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    started = []
    monkeypatch.setattr(core.jobs.worker, "ensure_workers", lambda *a, **k: started.append(1) or [])
    at = run_page()
    assert not at.exception
    assert "No model yet" in at.info[0].value and not jobs.list_jobs() and not started
    at.button(key="quick_train").click().run()
    assert not at.exception and started  # a worker is asked for at once
    [job] = jobs.list_jobs(kind="train")
    assert job.params["mode"] == "frozen" and job.params["data"] == str(small_abid)
    assert job.params["n_train"] > 0 and job.status == "queued"
    assert any(p.text.startswith(f"Training job {job.id}: ") for p in at.get("progress"))
    again = run_page()  # a later visit shows the queued job, not a second button
    assert "quick_train" not in [b.key for b in again.button]
    assert any(p.text.startswith(f"Training job {job.id}: ") for p in again.get("progress"))


def test_an_upload_batch_with_every_kind_of_bad_file(shared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = photos(shared, 3)
    # The uploader only takes photo extensions (the browser refuses the others), so bad files come renamed.
    bad = {case: (str(Path(name).with_suffix(".jpg")) if Path(name).suffix not in (".jpg", ".png") else name, make,
                  message) for case, (name, make, message) in BAD_FILES.items()}
    files = [("../../" + good[0].name, good[0].read_bytes(), "image/jpeg")]
    for name, make, _ in bad.values():
        files.append((name, make(good[1].read_bytes()), "image/jpeg"))
    files += [(p.name, p.read_bytes(), "image/jpeg") for p in good[1:]]
    at = run_page()
    at.file_uploader(key="predict_files").set_value(files).run()
    assert not at.exception
    shown = shown_metrics(at)
    assert shown["Photos predicted"] == "3" and shown["Could not be read"] == str(len(BAD_FILES))
    errors = [e.value for e in at.error]
    for name, _, message in bad.values():
        assert any(e.startswith(f"{name}: ") and message in e for e in errors), (name, errors)
    table = batch_table(at)
    assert list(table["name"]) == [good[0].name] + [n for n, _, _ in bad.values()] + [p.name for p in good[1:]]
    expected = expected_predictions(shared, at.selectbox(key="predict_run").value, good).set_index("photo")
    predicted = table[table["error"].isna()].set_index("name")
    assert (predicted["predicted"] == expected.loc[predicted.index, "predicted"]).all()
    assert predicted["confidence"].to_numpy() == pytest.approx(expected.loc[predicted.index, "confidence"].to_numpy(),
                                                               abs=1e-5)
    assert len(at.image) == 3 and len(at.get("plotly_chart")) == 3  # each photo with its probability bars
    assert [b.label for b in at.get("download_button")] == ["Download the table (CSV)"]
    assert not list(tmp_path.iterdir())  # nothing written next to the working directory
    staged = sorted(p.name for p in uploads.uploads_dir().rglob("*") if p.is_file())
    assert staged == sorted(p.name for p in good)  # only the good photos, under their safe names


def test_threshold_flags_low_confidence_without_predicting_again(shared, monkeypatch):
    import core.models.inference

    calls = []
    real = core.models.inference.predict_photos
    monkeypatch.setattr(core.models.inference, "predict_photos", lambda *a, **k: calls.append(1) or real(*a, **k))
    good = photos(shared, 4)
    at = run_page()
    at.file_uploader(key="predict_files").set_value([(p.name, p.read_bytes(), "image/jpeg") for p in good]).run()
    table = batch_table(at)
    at.slider(key="predict_threshold").set_value(1.0).run()
    assert shown_metrics(at)["Low confidence"] == "4" and batch_table(at)["low_confidence"].all()
    at.slider(key="predict_threshold").set_value(0.0).run()
    assert shown_metrics(at)["Low confidence"] == "0"
    middle = round(float(table["confidence"].median()) * 20) / 20  # on the slider's 0.05 steps
    at.slider(key="predict_threshold").set_value(middle).run()
    flagged = batch_table(at)
    assert flagged["low_confidence"].fillna(False).astype(bool).tolist() == (table["confidence"] < middle).tolist()
    assert shown_metrics(at)["Low confidence"] == str(int((table["confidence"] < middle).sum()))
    assert calls == [1]  # one prediction for the batch, whatever the threshold
    run_id = at.selectbox(key="predict_run").value
    assert config.load_settings()["low_confidence_thresholds"][run_id] == at.slider(key="predict_threshold").value


def test_a_local_folder_with_a_photo_damaged_inside(shared, tmp_path):
    folder = tmp_path / "new_bins"
    folder.mkdir()
    good = photos(shared, 3)
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_cut.jpg").write_bytes(good[0].read_bytes()[:2000])  # decodes badly: caught while predicting
    (folder / "notes.txt").write_text("not a photo")
    at = run_page()
    at.radio(key="predict_origin").set_value("Local folder").run()
    at.text_input(key="predict_folder").input(str(folder)).run()
    assert not at.exception
    assert shown_metrics(at)["Photos predicted"] == "3" and shown_metrics(at)["Could not be read"] == "1"
    assert any(e.value.startswith("zz_cut.jpg: the image is damaged or truncated") for e in at.error)
    assert any("1 files without a photo extension" in c.value for c in at.caption)
    engine = next(c.value for c in at.caption if c.value.startswith("Counted with"))
    assert engine.startswith(("Counted with OpenVINO (fp32): within", "Counted with PyTorch")), engine
    at.text_input(key="predict_folder").input(str(tmp_path / "nowhere")).run()
    assert "does not exist" in at.error[0].value


def test_the_bfloat16_toggle_counts_with_openvino_in_bf16(shared, tmp_path):
    from core.models.engines import bf16_supported

    if not bf16_supported():
        pytest.skip("this CPU has no native bfloat16 (or OpenVINO is missing): the toggle is not offered")
    folder = tmp_path / "bins"
    folder.mkdir()
    for p in photos(shared, 3):
        (folder / p.name).write_bytes(p.read_bytes())
    at = run_page()
    at.radio(key="predict_origin").set_value("Local folder").run()
    at.text_input(key="predict_folder").input(str(folder)).run()
    assert any(c.value.startswith("Counted with OpenVINO (fp32)") for c in at.caption)
    at.toggle(key="predict_bf16").set_value(True).run()
    assert not at.exception
    assert shown_metrics(at)["Photos predicted"] == "3"
    assert any(c.value.startswith("Counted with OpenVINO (bf16)") for c in at.caption)
    assert "--precision bf16" in at.code[0].value


def test_an_s3_prefix_and_a_missing_key(shared, tmp_path_factory, monkeypatch):
    world = shared_world(tmp_path_factory)  # a real S3 server (moto) holding an aft-vbi-pds lookalike
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", world.url)
    at = run_page()
    at.radio(key="predict_origin").set_value("S3").run()
    at.number_input(key="predict_s3_limit").set_value(3)
    at.text_input(key="predict_s3").input("s3://aft-vbi-pds/bin-images/").run()
    assert not at.exception and not at.error
    assert shown_metrics(at)["Photos predicted"] == "3"
    assert any("Only the first 3 photos under bin-images/" in c.value for c in at.caption)
    fetched = sorted(p.name for p in (config.home() / "s3-cache").rglob("*.jpg"))
    assert fetched == sorted(batch_table(at)["name"])  # downloaded into the cache under BINSIGHT_HOME
    at.text_input(key="predict_s3").input("s3://aft-vbi-pds/bin-images/no-such-bin.jpg").run()
    assert at.error[0].value == "no-such-bin.jpg: not in s3://aft-vbi-pds"
    at.text_input(key="predict_s3").input("https://example.com/x.jpg").run()
    assert "is not an S3 URI" in at.error[0].value


def test_choosing_the_current_model(shared):
    at = run_page()
    ids = [o.split(" · ")[0] for o in at.selectbox(key="predict_run").options]
    assert sorted(ids) == ["baseline", "better"]
    run_id = next(i for i in ids if i != at.selectbox(key="predict_run").value)
    at.selectbox(key="predict_run").set_value(run_id).run()
    at.button(key="make_current").click().run()
    assert not at.exception
    assert current_run().id == run_id
    assert run_page().selectbox(key="predict_run").value == run_id


def test_prediction_sees_the_training_tensor_for_the_same_photo(runs):
    """An uploaded photo reaches the model as the very tensor the training's feature extraction used."""
    from core.models.features import extract_features

    model, meta = load_model(runs["runs"]["better"] / "model.pt")
    seen = {"train": [], "predict": []}

    class Recorder(torch.nn.Module):
        def __init__(self, inner, key):
            super().__init__()
            self.inner, self.key = inner, key

        def forward(self, x):
            seen[self.key].append(x.detach().clone())
            return self.inner(x)

    photo = photos(runs, 1)[0]
    extract_features(Recorder(model.backbone, "train"), meta, [str(photo)], num_workers=0)  # fresh cache: computed
    staged = uploads.stage_uploads([(photo.name, photo.read_bytes())])
    predict_inputs(Recorder(model, "predict"), meta, staged)
    assert seen["train"][0].shape == seen["predict"][0].shape == (1, 3, 96, 96)
    assert torch.equal(seen["train"][0], seen["predict"][0])


def test_a_folder_with_subfolders_pages_through_and_serves_the_shown_table(shared, tmp_path, served_files):
    import shutil

    folder = tmp_path / "bins"
    (folder / "aisle-2").mkdir(parents=True)
    chosen = photos(shared, 14)
    for i, path in enumerate(chosen):
        shutil.copy(path, folder / ("aisle-2" if i % 2 else "") / path.name)
    at = run_page()
    at.radio(key="predict_origin").set_value("Local folder").run()
    at.text_input(key="predict_folder").set_value(str(folder)).run()
    assert shown_metrics(at)["Photos predicted"] == "7"  # the top folder only
    at.checkbox(key="predict_recursive").check().run()
    assert not at.exception and shown_metrics(at)["Photos predicted"] == "14"
    table = batch_table(at)
    assert sorted(table["name"]) == sorted((f"aisle-2/{p.name}" if i % 2 else p.name) for i, p in enumerate(chosen))
    assert len(at.image) == 12 and at.number_input(key="predict_page").max == 2  # 12 photos a page
    at.number_input(key="predict_page").set_value(2).run()
    assert len(at.image) == 2
    [button] = at.get("download_button")
    served = pd.read_csv(io.BytesIO(served_files(button)))
    assert list(served["name"]) == list(table["name"])
    assert list(served["predicted"]) == [int(p) for p in table["predicted"]]
    # The toss-up survives the export: "2 or 3" is predicted 2 or 3, second_count the other, tie true
    probs = served[[f"prob_{c}" for c in range(1, 6)]].to_numpy()
    top_two = np.sort(probs, axis=1)[:, -2:]
    assert list(served["tie"]) == list(top_two[:, 1] - top_two[:, 0] <= CLOSE_CALL)
    for row, p in zip(served.itertuples(), probs):
        expected = np.argsort(p)[-2] + 1 if row.tie else None
        assert (pd.isna(row.second_count) and expected is None) or row.second_count == expected
