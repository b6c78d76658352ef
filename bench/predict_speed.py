"""Benchmark: Predict's CPU speed with each engine (PyTorch, ONNX Runtime, OpenVINO), one photo and in batches.

    python bench/predict_speed.py [--run RUN_DIR] [--photos 64] [--engines torch,onnx,openvino,openvino-bf16]
                                  [--batch-size 32]

Two models are measured: the fine-tune default (288×395 input, four test-time views; --run's model.pt when
given, else an EfficientNet-Lite0 with an untrained head, since speed does not depend on what the head
learned) and a 224² one-view model. Each is copied to a temporary folder first (its model.onnx is written
beside it). Figures include decoding and preprocessing. Photos come from ../shared/abid, else the demo set.
On a machine whose cores are shared, the figures move with the neighbours' load: quote them with that caveat
(the load average is printed).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ABID = (ROOT / ".." / "shared" / "abid").resolve()


def bench_photos(n: int) -> list[str]:
    if (ABID / "bin-images").is_dir():
        return [str(p) for p in sorted((ABID / "bin-images").glob("*.jpg"))[:n]]
    from core.data.layouts.demo import generate_demo

    demo = generate_demo(Path(tempfile.mkdtemp(prefix="binsight-bench-demo-")))
    return [str(p) for p in sorted((demo / "bin-images").glob("*.jpg"))[:n]]


def untrained_model(folder: Path, image_size: int, aspect: float, tta: str) -> Path:
    from core.models import networks as models
    from core.models.preprocess import preprocessing

    backbone, info = models.build_backbone("efficientnet_lite0")
    meta = info | preprocessing(info, image_size, aspect) | {"classes": [1, 2, 3, 4, 5], "head": "mlp", "tta": tta}
    model = models.CountingModel(backbone, models.make_head("mlp", info["feature_dim"], 5)).eval()
    return models.save_model(folder / "model.pt", model, meta)


def load_engine(model_path: Path, label: str):
    """(runtime, meta) for an engine label of --engines: onnx, openvino or openvino-bf16."""
    from core.models.engines import load_fast_model

    name, _, precision = label.partition("-")
    return load_fast_model(model_path, engine=name, precision=precision or "fp32")


def measure(label: str, model, meta, photos: list[str], batch_size: int) -> None:
    from core.models.inference import predict_photos

    predict_photos(model, meta, photos[:2], batch_size=2, device="cpu", num_workers=0)  # warm-up
    # Medians: on a shared machine a busy neighbour makes single timings jump.
    single = []
    for path in photos[: min(16, len(photos))]:
        start = time.perf_counter()
        predict_photos(model, meta, [path], batch_size=1, device="cpu", num_workers=0)
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    frame = predict_photos(model, meta, photos, batch_size=batch_size, device="cpu")
    rate = len(photos) / (time.perf_counter() - start)
    assert frame["error"].isna().all()
    print(f"{label:<44} one at a time {statistics.median(single):7.1f} ms/photo (median of {len(single)})   "
          f"batches of {batch_size}: {rate:6.1f} photos/s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a fine-tune run folder (model.pt); default: an untrained-head Lite0")
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--engines", default="torch,onnx,openvino,openvino-bf16",
                        help="torch, onnx (ONNX Runtime), openvino, openvino-bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("BINSIGHT_HOME", tempfile.mkdtemp(prefix="binsight-bench-"))
    import torch

    from core.models.networks import load_model
    from core.models.preprocess import input_size, tta_views

    work = Path(tempfile.mkdtemp(prefix="binsight-bench-models-"))
    finetune = work / "finetune"
    if args.run:
        finetune.mkdir()
        shutil.copy(Path(args.run).expanduser() / "model.pt", finetune / "model.pt")
        if (Path(args.run).expanduser() / "config.json").is_file():  # the engines are checked on its dataset's photos
            shutil.copy(Path(args.run).expanduser() / "config.json", finetune / "config.json")
    else:
        untrained_model(finetune, 288, 1.37, "flips")
    small = work / "one_view_224"
    untrained_model(small, 224, 1.0, "none")
    photos = bench_photos(args.photos)
    print(f"{len(photos)} photos; torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (shared machine: figures move with the neighbours' load)")
    try:
        for folder in (finetune, small):
            for engine in args.engines.split(","):
                if engine != "torch":
                    started = time.perf_counter()
                    model, meta = load_engine(folder / "model.pt", engine)
                    print(f"  ({engine}: export and check {time.perf_counter() - started:.1f} s, max probability "
                          f"difference from PyTorch {model.check['max_difference']:.1g} on "
                          f"{model.check['photos']} real photos)")
                else:
                    model, meta = load_model(folder / "model.pt")
                label = f"{'×'.join(map(str, input_size(meta)))}, {len(tta_views(meta))} view(s), {engine}"
                measure(label, model, meta, photos, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
