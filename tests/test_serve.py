"""The prediction service over real HTTP: /ping, photos, s3:// URIs, every kind of bad input, dynamic batching, ONNX."""
from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.data.photos.uploads import photo_problem
from core.models.catalog import FEATURE_SETS
from core.models.inference import predict_photos
from core.models.networks import backbone_spec, build_model, load_model, save_model
from core.models.preprocess import preprocessing
from tests.conftest import make_abid_subset
from tests.moto_s3 import PUBLIC_BUCKET, shared_world

MAX_BODY = 2 * 1024 * 1024


def small_model(path: Path, backbone: str = "simple_cnn", size: int = 64, aspect: float = 1.0, tta="flips",
                features: str | None = None) -> Path:
    spec = backbone_spec(backbone)
    meta = {"backbone": backbone, "head": "mlp", "classes": [1, 2, 3, 4, 5], "tta": tta, "temperature": 1.5,
            **preprocessing({"mean": spec.mean, "std": spec.std}, size, aspect)}
    if features:
        meta |= {"features": features, "feature_taps": FEATURE_SETS[features].taps_list()}
    torch.manual_seed(0)
    model = build_model(meta, pretrained=False).eval()
    return save_model(path / "model.pt", model, meta)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = make_abid_subset(tmp_path_factory.mktemp("serve_photos"), per_class=2)
    return sorted((folder / "bin-images").glob("*.jpg"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from core.serving.server import BackgroundServer

    model = small_model(tmp_path_factory.mktemp("serve_run"))
    # A generous window so that requests sent together reliably meet in the batcher on a busy machine.
    with BackgroundServer(model, max_batch=8, window_ms=150, max_body_bytes=MAX_BODY) as running:
        yield running
        assert httpx.get(f"{running.url}/ping").status_code == 200, "the server went down during the tests"


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def post_photo(client, data: bytes, kind: str = "image/jpeg", **headers) -> httpx.Response:
    return client.post("/invocations", content=data, headers={"content-type": kind, **headers})


def torch_probabilities(server, paths) -> np.ndarray:
    model, meta = load_model(server.service.model_path)
    frame = predict_photos(model, meta, paths, batch_size=8, device="cpu", num_workers=0)
    return frame[[f"prob_{c}" for c in meta["classes"]]].to_numpy(dtype=float)


def test_ping_model_description_and_docs(client, server):
    ping = client.get("/ping")
    assert ping.status_code == 200 and ping.headers["X-Request-Id"]
    assert client.get("/ping", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    described = client.get("/model").json()
    assert described["backbone"] == "simple_cnn" and described["classes"] == [1, 2, 3, 4, 5]
    assert described["tta_views"] == ["plain", "hflip", "vflip", "hvflip"] and described["temperature"] == 1.5
    assert described["engine"] == "openvino" and described["precision"] == "fp32"
    assert described["engine_check"]["max_difference"] <= 1e-4 and described["model"] == server.service.model_id
    assert described["model_card"].startswith(f"# Model card: {server.service.model_path.parent.name}")
    assert f"| model file | {server.service.model_id} |" in described["model_card"]
    assert client.get("/docs").status_code == 200
    assert "/invocations" in client.get("/openapi.json").json()["paths"]


def test_one_photo_gets_its_count_as_pytorch_would(client, server, photos):
    answer = post_photo(client, photos[0].read_bytes())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    probs = np.array([body["probabilities"][str(c)] for c in range(1, 6)])
    assert abs(probs.sum() - 1) < 1e-5
    assert body["count"] == int(np.argmax(probs)) + 1 and body["confidence"] == pytest.approx(probs.max())
    assert body["low_confidence"] == (body["confidence"] < 0.6) and body["model"] == server.service.model_id
    assert np.abs(probs - torch_probabilities(server, [photos[0]])[0]).max() <= 1e-4
    png = io.BytesIO()
    Image.open(photos[0]).save(png, "PNG")
    assert post_photo(client, png.getvalue(), "application/x-image").json()["count"] == body["count"]


def test_a_json_list_of_s3_uris_gets_one_result_per_photo(client, server, tmp_path_factory, monkeypatch):
    world = shared_world(tmp_path_factory)
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", world.url)
    names = list(world.labels)[:2]
    uris = [f"s3://{PUBLIC_BUCKET}/bin-images/{n}" for n in names]
    uris += [f"s3://{PUBLIC_BUCKET}/bin-images/no-such-photo.jpg", "https://example.com/a.jpg"]
    answer = client.post("/invocations", json=uris)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["uri"] for r in results] == uris
    expected = torch_probabilities(server, [world.source / "bin-images" / n for n in names])
    for result, probs in zip(results[:2], expected):
        assert "error" not in result and result["count"] in range(1, 6)
        assert np.abs(np.array(list(result["probabilities"].values())) - probs).max() <= 1e-4
    assert results[2]["error"] == f"no-such-photo.jpg: not in s3://{PUBLIC_BUCKET}"
    assert "not an S3 URI" in results[3]["error"]


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (9000, 5000)).save(buffer, "PNG")  # 45 megapixels in a few kilobytes
    return buffer.getvalue()


def test_bad_input_gets_a_clear_status_and_message_and_the_server_stays_up(client, photos):
    good = photos[0].read_bytes()
    for data in (b"", b"<!doctype html><html>oops</html>", b"just some words", good[: len(good) // 3],
                 b"\xff\xd8\xff\xe0 not really a jpeg", bomb_png()):
        answer = post_photo(client, data)
        assert answer.status_code == 400, (data[:20], answer.text)
        assert answer.json()["error"] == photo_problem(data, "photo")
        assert answer.headers["X-Request-Id"] == answer.json()["request_id"]
    assert "decompression bomb" in post_photo(client, bomb_png(), "image/png").json()["error"]
    assert post_photo(client, good, "text/plain").status_code == 415
    assert post_photo(client, good, "").status_code == 415
    assert post_photo(client, b"\xff" * (MAX_BODY + 1)).status_code == 413
    assert "not valid JSON" in post_photo(client, b"[s3://", "application/json").json()["error"]
    assert post_photo(client, b'{"uris": 3}', "application/json").status_code == 400
    assert client.get("/invocations").status_code == 405
    assert client.get("/ping").status_code == 200
    assert post_photo(client, good).status_code == 200


def test_concurrent_requests_share_forward_passes_with_unchanged_results(client, server, photos):
    bodies = [p.read_bytes() for p in photos[:8]]
    alone = [post_photo(client, b).json()["probabilities"] for b in bodies]
    before = server.service.batcher.stats()
    start = threading.Barrier(len(bodies))

    def send(body):
        with httpx.Client(base_url=server.url, timeout=60) as own:
            start.wait(timeout=30)
            return post_photo(own, body).json()["probabilities"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(send, bodies))
    after = server.service.batcher.stats()
    assert after["shared_passes"] > before["shared_passes"], after
    assert after["forward_passes"] - before["forward_passes"] < len(bodies)
    for one, shared in zip(alone, together):
        assert max(abs(one[k] - shared[k]) for k in one) <= 1e-5


@pytest.mark.parametrize("engine, runtime, features", [("openvino", "OpenVinoModel", None),
                                                       ("onnx", "OnnxRuntimeModel", None),
                                                       ("onnx", "OnnxRuntimeModel", "multilevel")])
def test_the_exported_efficientnet_equals_pytorch_on_real_photos(tmp_path, photos, engine, runtime, features):
    from core.models import engines
    from core.models.export import ensure_onnx

    path = small_model(tmp_path, "efficientnet_lite0", size=96, aspect=1.37, tta="hflip", features=features)
    fast, meta = engines.load_fast_model(path, engine=engine)
    assert isinstance(fast, getattr(engines, runtime)) and (tmp_path / "model.onnx").is_file()
    assert fast.check["max_difference"] <= 1e-4 and fast.check["same_counts"]
    model, _ = load_model(path)
    slow = predict_photos(model, meta, photos, batch_size=4, device="cpu", num_workers=0)
    quick = predict_photos(fast, meta, photos, batch_size=4, device="cpu", num_workers=0)
    columns = [f"prob_{c}" for c in meta["classes"]]
    assert list(quick.columns) == list(slow.columns) and quick["predicted"].equals(slow["predicted"])
    assert np.abs(quick[columns].to_numpy() - slow[columns].to_numpy()).max() <= 1e-4
    stamp = (tmp_path / "model.onnx").stat().st_mtime_ns
    assert ensure_onnx(path) == tmp_path / "model.onnx" and (tmp_path / "model.onnx").stat().st_mtime_ns == stamp


def test_an_engine_that_disagrees_with_pytorch_is_not_used(tmp_path, monkeypatch):
    from core.models import engines
    from core.models.export import ExportError

    path = small_model(tmp_path)
    monkeypatch.setitem(engines.TOLERANCE, "fp32", 0.0)  # no engine but PyTorch itself can be that exact
    monkeypatch.setattr(engines, "compare_with_torch", lambda *a: {"max_difference": 1e-6, "photos": 8,
                                                                  "same_counts": True})
    fast, _ = engines.load_fast_model(path)
    assert isinstance(fast, engines.TorchModel)
    with pytest.raises(ExportError, match="differs from PyTorch by 1e-06 on 8 photos"):
        engines.load_fast_model(path, engine="onnx")


def test_engines_are_checked_on_the_models_own_photos_passing_over_damaged_ones(tmp_path, photos):
    import json

    from core.models import engines

    data = tmp_path / "data" / "bin-images"
    data.mkdir(parents=True)
    (data / "0000-cut.jpg").write_bytes(photos[0].read_bytes()[:1500])
    for photo in photos[:3]:
        (data / photo.name).write_bytes(photo.read_bytes())
    run = tmp_path / "run"
    path = small_model(run)
    (run / "config.json").write_text(json.dumps({"data": str(data.parent)}))
    fast, _ = engines.load_fast_model(path, engine="onnx")
    assert fast.check == json.loads((run / "model.onnx.checks.json").read_text()).popitem()[1]
    assert fast.check["photos"] == 3 and fast.check["max_difference"] <= 1e-4


def test_bfloat16_stays_within_its_tolerance_and_needs_openvino(tmp_path, photos):
    import openvino as ov

    from core.models import engines

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no native bfloat16")
    path = small_model(tmp_path, "efficientnet_lite0", size=96, aspect=1.37, tta="flips")
    fast, meta = engines.load_fast_model(path, engine="openvino", precision="bf16")
    assert fast.precision == "bf16" and 0 < fast.check["max_difference"] <= engines.TOLERANCE["bf16"]
    with pytest.raises(engines.ExportError, match="OpenVINO"):
        engines.load_fast_model(path, engine="onnx", precision="bf16")


def test_cli_serve_defaults_to_the_current_model(tmp_path):
    from core.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.model, args.port, args.host) == (None, 8080, "127.0.0.1")
    assert main(["serve"]) == 2  # no current model yet: a clear message, not a traceback


def test_cli_predicts_every_photo_under_an_s3_prefix(tmp_path, tmp_path_factory, monkeypatch, capsys):
    import pandas as pd

    from core.cli import main

    world = shared_world(tmp_path_factory)
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", world.url)
    model = small_model(tmp_path / "run")
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(model), f"s3://{PUBLIC_BUCKET}/bin-images/", "--csv", str(out),
                 "--batch-size", "16"]) == 0
    frame = pd.read_csv(out)
    assert sorted(frame["photo"]) == sorted(world.labels) and frame["error"].isna().all()
    assert frame["path"].str.startswith(f"s3://{PUBLIC_BUCKET}/bin-images/").all()
    assert "photos/s" in capsys.readouterr().err
    assert main(["predict", "--model", str(model), f"s3://{PUBLIC_BUCKET}/nothing-here/"]) == 2


def test_a_toss_up_keeps_both_counts_in_the_answer_and_in_the_csv(client, server, photos):
    from core.models.inference import CLOSE_CALL, with_ties

    body = post_photo(client, photos[0].read_bytes()).json()
    ranked = sorted(body["probabilities"].items(), key=lambda kv: -kv[1])
    close = ranked[0][1] - ranked[1][1] <= CLOSE_CALL
    assert body["tie"] == close and body["second_count"] == (int(ranked[1][0]) if close else None)
    # The service's answer to probabilities a toss-up apart: "3 or 4" is count 4 (the likelier), second_count 3
    tied = server.service.answer(np.array([0.05, 0.1, 0.41, 0.43, 0.01]))
    assert (tied["count"], tied["second_count"], tied["tie"]) == (4, 3, True)
    clear = server.service.answer(np.array([0.05, 0.1, 0.2, 0.64, 0.01]))
    assert (clear["count"], clear["second_count"], clear["tie"]) == (4, None, False)
    schema = client.get("/openapi.json").json()["paths"]["/invocations"]["post"]["responses"]["200"]
    answer = schema["content"]["application/json"]["schema"]["anyOf"][0]["properties"]
    assert {"second_count", "tie"} <= set(answer)
    # The same in a CSV: the columns follow the prediction; an unreadable photo has neither
    frame = pd.DataFrame({"name": ["a.jpg", "b.jpg", "c.jpg"], "predicted": [4, 4, None],
                          **{f"prob_{c}": [t, k, None] for c, t, k in zip(range(1, 6), [0.05, 0.1, 0.41, 0.43, 0.01],
                                                                          [0.05, 0.1, 0.2, 0.64, 0.01])},
                          "error": [None, None, "not a photo"]})
    exported = pd.read_csv(io.StringIO(with_ties(frame).to_csv(index=False)))
    assert list(exported.columns[:4]) == ["name", "predicted", "second_count", "tie"]
    assert exported["second_count"].tolist()[0] == 3 and exported["second_count"].isna().tolist()[1:] == [True, True]
    assert exported["tie"].tolist()[:2] == [True, False] and pd.isna(exported["tie"].iloc[2])
