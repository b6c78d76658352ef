"""Benchmark: what each prediction engine and precision costs in accuracy, on a dataset's split, against PyTorch.

    python bench/engine_agreement.py --run RUN_DIR [--data ../shared/abid] [--split test]
                                     [--engines onnx,openvino,openvino-bf16]

For each engine: balanced accuracy on the split, the largest probability difference from PyTorch, and how many
photos change their predicted count. Accuracy figures hold on a busy machine; the speeds printed do not.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder with model.pt")
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "abid"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--engines", default="onnx,openvino,openvino-bf16")
    args = parser.parse_args()
    os.environ.setdefault("BINSIGHT_HOME", tempfile.mkdtemp(prefix="binsight-bench-"))
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score

    from core.data.layouts.registry import load_dataset
    from predict_speed import load_engine

    from core.models.inference import predict_photos
    from core.models.networks import load_model

    rows = load_dataset(args.data).rows()
    rows = rows[rows["split"] == args.split]
    paths, truth = list(rows["path"]), rows["count"].to_numpy()
    model_path = Path(args.run).expanduser() / "model.pt"
    model, meta = load_model(model_path)
    columns = [f"prob_{c}" for c in meta["classes"]]

    def scored(label, predictor):
        started = time.perf_counter()
        frame = predict_photos(predictor, meta, paths, batch_size=16)
        seconds = time.perf_counter() - started
        return label, frame, seconds

    results = [scored("torch fp32", model)]
    for engine in args.engines.split(","):
        fast, _ = load_engine(model_path, engine)
        results.append(scored(f"{fast.engine} {fast.precision}", fast))
    reference = results[0][1]
    print(f"\n{len(paths)} photos of {args.data} ({args.split} split), model {model_path}\n")
    print("| engine | balanced accuracy | max probability difference from PyTorch | counts changed | photos/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, frame, seconds in results:
        accuracy = balanced_accuracy_score(truth, frame["predicted"].astype(int))
        difference = np.abs(frame[columns].to_numpy() - reference[columns].to_numpy()).max()
        changed = int((frame["predicted"] != reference["predicted"]).sum())
        print(f"| {label} | {accuracy:.1%} | {difference:.1g} | {changed} of {len(frame)} | {len(frame) / seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
