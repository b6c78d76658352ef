"""Speed figures on this machine: feature extraction and fine-tune images/s, time-to-model vs the study, inference ms/photo.

    python bench/train_speed.py --data ../shared/abid --photos 200

(a) images/s of Lite0 feature extraction and of a fine-tune step; (b) time-to-model of the original study's
recipe (frozen ResNet50 recomputed in each of 10 epochs, 2-layer MLP head) against Binsight `frozen`
(features computed once and cached), on the same photos; (c) inference ms/photo for Lite0 at 224.
ResNet50's ImageNet weights are not needed for timing: random weights cost the same.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def subset(data: str, photos: int, folder: Path) -> Path:
    """An ABID-layout folder with `photos` photos (equal per count 1–5) linked from `data`."""
    import pandas as pd

    source = Path(data)
    labels = pd.read_csv(source / "labels.csv")
    chosen = pd.concat([group.head(photos // 5) for _, group in labels[labels["count"].between(1, 5)].groupby("count")])
    (folder / "bin-images").mkdir(parents=True)
    for name in chosen["image"]:
        os.symlink(source / "bin-images" / name, folder / "bin-images" / name)
    chosen.to_csv(folder / "labels.csv", index=False)
    return folder


def photo_paths(folder: Path) -> list[str]:
    return sorted(str(p) for p in (folder / "bin-images").glob("*.jpg"))


def extraction_speed(paths, image_size: int) -> float:
    from core.models.features import extract_features
    from core.models.networks import build_backbone
    from core.models.preprocess import preprocessing

    backbone, info = build_backbone("efficientnet_lite0")
    result = extract_features(backbone, info | preprocessing(info, image_size), paths)
    return result.computed / result.seconds


def finetune_speed(paths, image_size: int, steps: int = 6, batch_size: int = 16) -> float:
    from core.models.networks import CountingModel, build_backbone, make_head
    from core.models.preprocess import PhotoDataset, preprocessing, train_transform

    backbone, info = build_backbone("efficientnet_lite0")
    model = CountingModel(backbone, make_head("mlp", info["feature_dim"], 5)).train()
    meta = info | preprocessing(info, image_size)
    loader = torch.utils.data.DataLoader(PhotoDataset(paths, [0] * len(paths), train_transform(meta)),
                                         batch_size=batch_size, shuffle=True, num_workers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen, started = 0, None
    for step, (images, labels, _, _) in enumerate(loader):
        if step == 1:
            started, seen = time.perf_counter(), 0  # the first step warms up
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
        if step == steps:
            break
    return seen / (time.perf_counter() - started)


def study_recipe_seconds(paths, labels, epochs: int = 10) -> float:
    """Frozen ResNet50 run over every photo in every epoch, training the study's 2-layer MLP head."""
    import torchvision

    from core.models.preprocess import PhotoDataset, eval_transform

    started = time.perf_counter()
    backbone = torchvision.models.resnet50(weights=None)
    backbone.fc = nn.Identity()
    backbone.eval()
    head = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 5))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    meta = {"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    loader = torch.utils.data.DataLoader(PhotoDataset(paths, labels, eval_transform(meta)), batch_size=32,
                                         shuffle=True, num_workers=1)
    for _ in range(epochs):
        for images, target, _, _ in loader:
            with torch.no_grad():
                features = backbone(images)
            loss = nn.functional.cross_entropy(head(features), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def binsight_seconds(folder: Path, out: Path, epochs: int = 10) -> float:
    from core.training.config import TrainConfig
    from core.training.loop import train

    started = time.perf_counter()
    train(TrainConfig(data=str(folder), out=str(out), epochs=epochs, patience=0))
    return time.perf_counter() - started


def inference_ms(paths, image_size: int = 224) -> tuple[float, float]:
    """(ms/photo in batches of 32, ms for a single photo) for a Lite0 model at image_size."""
    from core.models.inference import predict_photos
    from core.models.networks import build_backbone, build_model
    from core.models.preprocess import preprocessing

    _, info = build_backbone("efficientnet_lite0")
    meta = info | preprocessing(info, image_size) | {"classes": [1, 2, 3, 4, 5], "head": "mlp"}
    model = build_model(meta).eval()
    predict_photos(model, meta, paths[:8])
    started = time.perf_counter()
    predict_photos(model, meta, paths)
    batched = (time.perf_counter() - started) * 1000 / len(paths)
    started = time.perf_counter()
    for path in paths[:10]:
        predict_photos(model, meta, [path])
    single = (time.perf_counter() - started) * 1000 / 10
    return batched, single


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "abid"))
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.environ["BINSIGHT_HOME"] = str(scratch / "home")  # a cold feature cache
        folder = subset(args.data, args.photos, scratch / "data")
        paths = photo_paths(folder)
        print(f"{len(paths)} photos, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
        print(f"(a) Lite0 feature extraction at {args.image_size}: {extraction_speed(paths, args.image_size):.1f} img/s")
        print(f"(a) Lite0 fine-tune step at {args.image_size} (batch 16): {finetune_speed(paths, args.image_size):.1f} img/s")
        os.environ["BINSIGHT_HOME"] = str(scratch / "home2")
        labels = [0] * len(paths)
        study = study_recipe_seconds(paths, labels)
        cold = binsight_seconds(folder, scratch / "run1")
        warm = binsight_seconds(folder, scratch / "run2")
        print(f"(b) time to model, 10 epochs: study (frozen ResNet50 recomputed each epoch) {study:.1f} s; "
              f"Binsight frozen Lite0 {cold:.1f} s with a cold cache ({study / cold:.1f}×), "
              f"{warm:.1f} s with a warm cache ({study / warm:.1f}×)")
        batched, single = inference_ms(paths, args.image_size)
        print(f"(c) Lite0 inference at {args.image_size}: {batched:.1f} ms/photo in batches of 32, "
              f"{single:.1f} ms for one photo alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
