"""Benchmark: the embeddings map's computation and the where-it-looked heatmaps, on CPU.

    BINSIGHT_HOME=/tmp/bench-home python bench/insight_speed.py [--data ../shared/abid] [--run RUN_DIR]
                                                                [--photos 20] [--skip-map]

Map: every labelled photo of --data (default ../shared/abid, else the demo set); the frozen features come from the
feature cache of BINSIGHT_HOME (computed first when missing, and timed apart), then the 2-D projection is timed with
the cached map removed, so the figure is the map's own. Heatmaps: Grad-CAM of each photo for two counts at once (as
Evaluate asks for a mistaken photo: the predicted count and the label), for --run's model.pt, else an
EfficientNet-Lite0 at the frozen default (multi-level features, 288×395) with an untrained head: speed does not depend
on what the head learned. On a machine whose cores are shared the figures move with the load (printed).
"""
import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ABID = (ROOT / ".." / "shared" / "abid").resolve()


def bench_map(data: str | None) -> None:
    from core import config
    from core.data.layouts.registry import load_dataset
    from core.evaluation.embedding_map import embedding_map, project
    from core.evaluation.label_issues import photo_features

    dataset = load_dataset(data)
    rows = dataset.rows("all")
    started = time.perf_counter()
    photo_features(dataset, rows)
    print(f"features of {len(rows):,} photos (cached ones read, the rest computed): "
          f"{time.perf_counter() - started:.1f} s")
    shutil.rmtree(config.home() / "embedding_maps" / dataset.key, ignore_errors=True)
    started = time.perf_counter()
    frame, info = embedding_map(dataset.key, rows)
    print(f"map of {len(frame):,} photos ({info['method']}), features cached: {time.perf_counter() - started:.1f} s "
          f"(reading features {info['feature_seconds']} s, projecting {info['map_seconds']} s)")
    started = time.perf_counter()
    embedding_map(dataset.key, rows)
    print(f"map again (cached): {time.perf_counter() - started:.2f} s")
    features, _ = photo_features(dataset, rows)
    started = time.perf_counter()
    project(features.mean(1))
    print(f"projection alone, UMAP already compiled in this process: {time.perf_counter() - started:.1f} s")


def bench_page() -> None:
    """The Browse page with the map shown (the map cached), first render and a rerun, through AppTest."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app_pages" / "browse.py"), default_timeout=600)
    for what in ("first render", "rerun"):
        started = time.perf_counter()
        at.run()
        shown = "with the map" if at.get("plotly_chart") else "WITHOUT the map"
        print(f"Browse page {what} {shown}: {time.perf_counter() - started:.2f} s")


def bench_heatmaps(run: str | None, n: int) -> None:
    import torch

    from core.models.heatmaps import heatmaps
    from core.models.networks import build_backbone, build_model, load_model
    from core.models.preprocess import photo_tensor, preprocessing

    if run:
        model, meta = load_model(run)
    else:
        _, info = build_backbone("efficientnet_lite0", features="multilevel")
        meta = info | preprocessing(info, 288, 1.37) | {"classes": [1, 2, 3, 4, 5], "head": "linear"}
        model = build_model(meta)
    paths = [str(p) for p in sorted((ABID / "bin-images").glob("*.jpg"))[:n + 1]]
    heatmaps(model, meta, paths[0], [1, 5])  # the first call imports grad-cam and warms up
    times, plain = [], []
    for path in paths[1:]:
        started = time.perf_counter()
        heatmaps(model, meta, path, [2, 4])
        times.append(time.perf_counter() - started)
        # the same photo counted once (decoding, one view, no gradient), so a loaded machine still gives the ratio
        started = time.perf_counter()
        with torch.inference_mode():
            model(photo_tensor(path, meta).unsqueeze(0))
        plain.append(time.perf_counter() - started)
    print(f"heatmaps ({meta['backbone']}, {meta.get('features') or 'pooled'}, input {meta['input_size']}), two counts "
          f"per photo: median {statistics.median(times) * 1000:.0f} ms/photo, slowest {max(times) * 1000:.0f} ms "
          f"over {len(times)} photos; one plain forward pass of the same photos: median "
          f"{statistics.median(plain) * 1000:.0f} ms ({statistics.median(times) / statistics.median(plain):.1f}×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ABID) if (ABID / "bin-images").is_dir() else None)
    parser.add_argument("--run", default=None, help="RUN_DIR or its model.pt (default: an untrained Lite0 head)")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--skip-map", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.skip_map:
        bench_map(args.data)
        if args.data:
            os.environ["BINSIGHT_DATA"] = args.data
        bench_page()
    bench_heatmaps(args.run, args.photos)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
