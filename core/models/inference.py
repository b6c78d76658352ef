"""Batched prediction of counts for photos, on the GPU when present; unreadable photos get an error, not a crash.

`model` is a PyTorch module, or an ONNX Runtime stand-in from core.models.export (anything with
`probabilities(images) -> array`, its test-time views already folded in).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.data.photos.uploads import PhotoInput
from core.models.networks import resolve_device
from core.models.preprocess import PhotoDataset, default_workers, eval_transform, tta_views, view_of

# Pages share one cached model between sessions (threads): moving it to a device or memory format while another
# thread runs it gave NaN probabilities under load (bench/soak.py), so it is prepared once, under this lock.
_PREPARING = threading.Lock()


def prepared_for(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in eval mode, on `device`, channels-last: converted the first time only, one thread at a time."""
    with _PREPARING:
        if getattr(model, "_binsight_prepared", None) != str(device):
            model.to(device).eval().to(memory_format=torch.channels_last)
            model._binsight_prepared = str(device)
    return model


def view_logits(model: torch.nn.Module, images: torch.Tensor, views=("plain",)) -> torch.Tensor:
    """The model's logits of a batch for each view (test-time augmentation): n × views × classes."""
    return torch.stack([model(view_of(images, view)).float() for view in views], 1)


def tempered_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated class probabilities from per-view logits (n × views × classes): mean over views of softmax(z / T)."""
    return (logits.float() / temperature).softmax(-1).mean(1)


def batch_probabilities(model: torch.nn.Module, images: torch.Tensor, views=("plain",),
                        temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities of a batch: the mean over the given views of softmax(logits / temperature)."""
    return tempered_probabilities(view_logits(model, images, views), temperature)


def predict_probabilities(model: torch.nn.Module, meta: dict, paths: list, batch_size: int = 32,
                          device: str | torch.device | None = None, num_workers: int | None = None,
                          on_progress=None, should_stop=None, with_uncalibrated: bool = False) -> tuple:
    """(probabilities n × classes, NaN rows for unreadable photos; {row: error message}).

    Probabilities use the model's fitted temperature (meta "temperature", 1 for older models); with
    `with_uncalibrated`, the probabilities at temperature 1 come third, from the same forward pass.
    """
    device = resolve_device("auto") if device is None else torch.device(device)
    n_classes = len(meta["classes"])
    temperature = float(meta.get("temperature", 1.0))
    probs = np.full((len(paths), n_classes), np.nan, dtype=np.float32)
    uncalibrated = probs.copy()
    errors: dict[int, str] = {}
    if not paths:
        return (probs, errors, uncalibrated) if with_uncalibrated else (probs, errors)
    dataset = PhotoDataset(paths, transform=eval_transform(meta))
    workers = default_workers() if num_workers is None else num_workers
    workers = min(workers, max(0, len(paths) // batch_size))  # no worker start-up cost for a handful of photos
    exported = not isinstance(model, torch.nn.Module)
    if exported:
        device = torch.device("cpu")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    if not exported:
        model = prepared_for(model, device)
    started, done = time.perf_counter(), 0
    with torch.inference_mode():
        for images, _, index, batch_errors in loader:
            if should_stop and should_stop():
                from core.errors import Cancelled

                raise Cancelled("stopped during prediction")
            if exported:
                if with_uncalibrated:
                    raise ValueError("an exported model gives calibrated probabilities only")
                batch = batch_uncalibrated = model.probabilities(images.numpy())
            else:
                images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
                with torch.autocast("cuda", enabled=device.type == "cuda"):
                    logits = view_logits(model, images, tta_views(meta))
                batch = tempered_probabilities(logits, temperature).cpu().numpy()
                batch_uncalibrated = tempered_probabilities(logits).cpu().numpy() if with_uncalibrated else batch
            for row, row_uncalibrated, i, error in zip(batch, batch_uncalibrated, index.tolist(), batch_errors):
                if error:
                    errors[i] = error
                else:
                    probs[i], uncalibrated[i] = row, row_uncalibrated
            done += len(index)
            if on_progress:
                elapsed = time.perf_counter() - started
                on_progress({"done": done, "total": len(paths), "fraction": done / len(paths),
                             "images_per_s": done / max(elapsed, 1e-9),
                             "message": f"Predicting photo {done}/{len(paths)}"})
    return (probs, errors, uncalibrated) if with_uncalibrated else (probs, errors)


def predictions_frame(paths: list, probs: np.ndarray, errors: dict[int, str], classes: list[int]) -> pd.DataFrame:
    """One row per photo: photo, path, predicted, confidence, prob_<count>..., error."""
    classes = [int(c) for c in classes]
    readable = ~np.isnan(probs).any(axis=1)
    best = np.nan_to_num(probs, nan=-1).argmax(axis=1)
    predicted = pd.array([classes[b] if ok else pd.NA for b, ok in zip(best, readable)], dtype="Int64")
    frame = pd.DataFrame({
        "photo": [Path(p).name for p in paths],
        "path": [str(p) for p in paths],
        "predicted": predicted,
        "confidence": np.where(readable, np.nan_to_num(probs, nan=0).max(axis=1), np.nan),
    })
    for column, count in enumerate(classes):
        frame[f"prob_{count}"] = probs[:, column]
    frame["error"] = [errors.get(i) for i in range(len(paths))]
    return frame


def predict_photos(model: torch.nn.Module, meta: dict, paths: list, batch_size: int = 32,
                   on_progress=None, device=None, num_workers: int | None = None,
                   with_uncalibrated: bool = False) -> pd.DataFrame:
    """Predicted count and class probabilities for each photo (a clear error instead for unreadable ones).

    With `with_uncalibrated`, raw_<count> columns hold the same photos' probabilities at temperature 1.
    """
    paths = [str(p) for p in paths]
    if not with_uncalibrated:
        probs, errors = predict_probabilities(model, meta, paths, batch_size, device, num_workers, on_progress)
        return predictions_frame(paths, probs, errors, meta["classes"])
    probs, errors, raw = predict_probabilities(model, meta, paths, batch_size, device, num_workers, on_progress,
                                               with_uncalibrated=True)
    frame = predictions_frame(paths, probs, errors, meta["classes"])
    for column, count in enumerate(meta["classes"]):
        frame[f"raw_{int(count)}"] = raw[:, column]
    return frame


def predict_inputs(model, meta: dict, inputs: list[PhotoInput], batch_size: int = 32,
                   on_progress=None) -> pd.DataFrame:
    """One row per input, in order: the prediction (predicted, confidence, prob_<count>) or the error."""
    usable = [i for i in inputs if i.path and not i.error]
    classes = [int(c) for c in meta["classes"]]
    predicted = None
    if usable:
        predicted = predict_photos(model, meta, [i.path for i in usable], batch_size=batch_size,
                                   on_progress=on_progress).reset_index(drop=True)
    rows, k = [], 0
    for item in inputs:
        row = {"name": item.name, "source": item.source, "path": item.path, "error": item.error}
        if item.path and not item.error:
            found = predicted.iloc[k]
            k += 1
            error = found.get("error")
            if isinstance(error, str) and error:
                row["error"] = error
            else:
                row.update(predicted=found["predicted"], confidence=found["confidence"],
                           **{f"prob_{c}": found[f"prob_{c}"] for c in classes})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["name", "predicted", "confidence"] + [f"prob_{c}" for c in classes]
                         + ["error", "source", "path"])
    frame["predicted"] = frame["predicted"].astype("Int64")
    frame["confidence"] = frame["confidence"].astype(float)
    return frame


# Two counts whose probabilities are this close are a toss-up: the page says "3 or 4", not "→ 4".
CLOSE_CALL = 0.05


def likely_counts(probabilities: dict[int, float], margin: float = CLOSE_CALL) -> list[int]:
    """The likeliest count, or the two likeliest (smaller first) when their probabilities are within `margin`."""
    ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])
    if len(ranked) > 1 and ranked[0][1] - ranked[1][1] <= margin:
        return sorted([ranked[0][0], ranked[1][0]])
    return [ranked[0][0]]


def second_count(probabilities: dict[int, float], margin: float = CLOSE_CALL) -> int | None:
    """The other count of a toss-up ("3 or 4": the one that is not the likeliest), None when there is none."""
    counts = likely_counts(probabilities, margin)
    if len(counts) < 2:
        return None
    best = max(probabilities, key=probabilities.get)
    return next(c for c in counts if c != best)


def with_ties(frame: pd.DataFrame, margin: float = CLOSE_CALL) -> pd.DataFrame:
    """A predictions frame (prob_<count> columns) with `tie` (the two likeliest counts are a toss-up) and
    `second_count` (the other count of the toss-up, empty otherwise) after `predicted`, for tables and exports."""
    probs = [c for c in frame.columns if c.startswith("prob_")]
    classes = [int(c.split("_", 1)[1]) for c in probs]
    seconds = [None if pd.isna(values).any() else second_count(dict(zip(classes, values)), margin)
               for values in frame[probs].to_numpy(dtype=float)] if len(frame) else []
    out = frame.copy()
    at = list(out.columns).index("predicted") + 1 if "predicted" in out else len(out.columns)
    out.insert(at, "second_count", pd.array(seconds, dtype="Int64"))
    out.insert(at + 1, "tie", out["second_count"].notna().astype("boolean").mask(out[probs].isna().any(axis=1)))
    return out
