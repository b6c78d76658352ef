"""Backbones with real weights, checkpoints, preprocessing and metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.evaluation.metrics import compute_metrics
from core.models import networks as models
from core.models.preprocess import eval_transform, input_size, photo_tensor, preprocessing, train_transform


def test_cat_photo_is_classified_as_a_cat_with_the_packaged_lite0_weights():
    from skimage.data import chelsea

    classifier = models.imagenet_classifier("efficientnet_lite0")
    _, info = models.build_backbone("efficientnet_lite0")
    meta = preprocessing(info, 224)
    with torch.inference_mode():
        probs = classifier(photo_tensor(Image.fromarray(chelsea()), meta)[None]).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert float(probs[281:286].sum()) > 0.5


def test_lite0_weights_come_from_the_package_in_order_without_the_classifier():
    backbone, info = models.build_backbone("efficientnet_lite0")
    source = torch.load(models.lite_package_weights("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert info["pretrained"] and info["weights"].startswith("efficientnet-lite0")
    assert torch.equal(backbone.state_dict()["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(backbone.state_dict()["conv_head.weight"], source["_conv_head.weight"])
    assert backbone(torch.zeros(1, 3, 96, 96)).shape == (1, 1280)


def test_resnet_without_weights_explains_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(models.WeightsError, match="--weights"):
        models.build_backbone("resnet50")


def test_resnet18_loads_a_weights_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    backbone, info = models.build_backbone("resnet18", weights=tmp_path / "resnet18.pth")
    assert torch.equal(backbone.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])
    assert info["feature_dim"] == 512 and info["weights"].startswith("resnet18.pth:")


def test_a_weights_file_that_does_not_fit_is_refused(tmp_path):
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(models.WeightsError, match="do not fit"):
        models.build_backbone("resnet18", weights=tmp_path / "other.pth")
    with pytest.raises(models.WeightsError, match="not a PyTorch weights file"):
        models.build_backbone("resnet18", weights=tmp_path / "junk.pth")
    with pytest.raises(models.WeightsError, match="no such weights file"):
        models.build_backbone("resnet18", weights=tmp_path / "missing.pth")


def test_simple_cnn_is_five_conv_and_four_fc_layers():
    model = models.build_model({"backbone": "simple_cnn", "classes": [1, 2, 3, 4, 5], "head": "mlp"})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert (len(convs), len(linears)) == (5, 4)
    assert model(torch.zeros(2, 3, 96, 128)).shape == (2, 5)


def test_saved_model_loads_alone_and_gives_identical_outputs(tmp_path):
    _, info = models.build_backbone("efficientnet_lite0")
    meta = info | preprocessing(info, 96) | {"classes": [1, 2, 3, 4, 5], "head": "linear"}
    model = models.build_model(meta).eval()
    models.save_model(tmp_path / "model.pt", model, meta)
    loaded, loaded_meta = models.load_model(tmp_path / "model.pt")
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert loaded_meta["classes"] == [1, 2, 3, 4, 5] and loaded_meta["input_size"] == [96, 96]
    with pytest.raises(FileNotFoundError):
        models.load_model(tmp_path / "missing.pt")


def test_a_multilevel_model_keeps_its_stages_even_when_the_named_set_changes(tmp_path, monkeypatch):
    from core.models import catalog
    from core.models.caches import cache_key

    _, info = models.build_backbone("efficientnet_lite0", features="multilevel")
    assert info["feature_taps"] == catalog.FEATURE_SETS["multilevel"].taps_list()
    meta = info | preprocessing(info, 96) | {"classes": [1, 2, 3, 4, 5], "head": "linear"}
    model = models.build_model(meta).eval()
    x = torch.randn(2, 3, 96, 128)
    assert model.backbone(x).shape == (2, info["feature_dim"])
    models.save_model(tmp_path / "model.pt", model, meta)
    pooled_key = cache_key({**meta, "features": None, "feature_taps": None})
    before = cache_key(meta)
    # A later release redefines "multilevel": the saved model still reads the stages it was trained on, and the
    # feature cache no longer hands out the old vectors under the new definition.
    changed = catalog.FeatureSet("multilevel", "another", (("stride16", ("mean",)),))
    monkeypatch.setitem(catalog.FEATURE_SETS, "multilevel", changed)
    loaded, loaded_meta = models.load_model(tmp_path / "model.pt")
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    _, new_info = models.build_backbone("efficientnet_lite0", features="multilevel")
    assert cache_key(meta | new_info) not in (before, pooled_key) and before != pooled_key


def test_a_model_saved_before_feature_sets_loads_as_pooled(tmp_path):
    _, info = models.build_backbone("efficientnet_lite0")
    assert "features" not in info and "feature_taps" not in info
    meta = info | preprocessing(info, 96) | {"classes": [1, 2, 3, 4, 5], "head": "mlp"}
    models.save_model(tmp_path / "model.pt", models.build_model(meta), meta)
    loaded, loaded_meta = models.load_model(tmp_path / "model.pt")
    assert loaded(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    assert not isinstance(loaded.backbone, models.MultiLevelBackbone)


def test_preprocessing_is_shared_and_keeps_the_whole_photo(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (350, 480, 3), dtype=np.uint8))
    image.save(tmp_path / "bin.png")
    meta = {"image_size": 96, "aspect": 1.5, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert input_size(meta) == (96, 144)
    from_path = photo_tensor(tmp_path / "bin.png", meta)
    assert from_path.shape == (3, 96, 144)
    assert torch.equal(from_path, eval_transform(meta)(image))
    assert train_transform(meta)(image).shape == (3, 96, 144)
    assert -1.0 <= float(from_path.min()) and float(from_path.max()) <= 1.0


def test_metrics_match_hand_computed_values():
    truth = [1, 1, 2, 2, 3, 5]
    predicted = [1, 2, 2, 2, 5, 4]
    m = compute_metrics(truth, predicted, [1, 2, 3, 4, 5])
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(3 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)  # class 4 is absent from the truth
    assert m["mae"] == pytest.approx((0 + 1 + 0 + 0 + 2 + 1) / 6)
    assert m["off_by_one"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"][0] == [1, 1, 0, 0, 0] and m["confusion_matrix"][2] == [0, 0, 0, 0, 1]
    assert m["per_class"]["2"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0 + 0 + 0) / 5)
    assert compute_metrics([1, 2], [1, 2], [1, 2, 3])["macro_f1"] == 1.0  # classes that never occur do not count
    assert set(m) >= {"classes", "macro_f1", "per_class", "confusion_matrix"}
    assert compute_metrics([], [], [1, 2])["n"] == 0
