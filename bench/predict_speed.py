"""Benchmark: Predict's ms/photo on the CPU, one photo at a time and in batches (decode, preprocessing, model).

    python bench/predict_speed.py [--run RUN_DIR] [--photos 64] [--image-size 224] [--batch-sizes 8,32] [--threads N]

Without --run it measures an EfficientNet-Lite0 with its real ImageNet backbone and an untrained head
(the speed does not depend on what the head learned). Photos come from ../shared/abid, else the demo set.
When other processes share the cores, compare with OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads of a
busy machine made single photos ~50x slower here).
"""
import argparse
import os
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
    from core.data.demo import generate_demo

    demo = generate_demo(Path(tempfile.mkdtemp(prefix="binsight-bench-demo-")))
    return [str(p) for p in sorted((demo / "bin-images").glob("*.jpg"))[:n]]


def bench_model(run: str | None, image_size: int):
    from core.models import networks as models
    from core.models.preprocess import preprocessing

    if run:
        return models.load_model(run, device="cpu")
    backbone, info = models.build_backbone("efficientnet_lite0")
    meta = info | preprocessing(info, image_size) | {"classes": [1, 2, 3, 4, 5], "head": "mlp"}
    head = models.make_head("mlp", info["feature_dim"], 5)
    return models.CountingModel(backbone, head).eval(), meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder (model.pt); default: an untrained-head EfficientNet-Lite0")
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    os.environ.setdefault("BINSIGHT_HOME", tempfile.mkdtemp(prefix="binsight-bench-"))
    import torch

    from core.models.inference import predict_photos

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = bench_model(args.run, args.image_size)
    photos = bench_photos(args.photos)
    print(f"{len(photos)} photos, input {meta.get('input_size') or meta['image_size']}, backbone {meta['backbone']}, "
          f"CPU threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    predict_photos(model, meta, photos[:4], batch_size=4, device="cpu", num_workers=0)  # warm-up

    # Medians and best-of-N: on a shared machine a busy neighbour makes single timings jump tenfold.
    single = []
    for path in photos[: min(16, len(photos))]:
        start = time.perf_counter()
        predict_photos(model, meta, [path], batch_size=1, device="cpu", num_workers=0)
        single.append((time.perf_counter() - start) * 1000)
    ms = statistics.median(single)
    print(f"{'one photo per call (what a single upload costs)':<46} {ms:8.1f} ms/photo (median; "
          f"max {max(single):.0f})  {1000 / ms:6.1f} photos/s")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            frame = predict_photos(model, meta, photos, batch_size=batch_size, device="cpu")
            runs.append((time.perf_counter() - start) * 1000 / len(photos))
            assert frame["error"].isna().all()
        ms = min(runs)
        print(f"{f'batches of {batch_size} (default DataLoader workers)':<46} {ms:8.1f} ms/photo (best of "
              f"{args.repeats})  {1000 / ms:6.1f} photos/s")


if __name__ == "__main__":
    main()
