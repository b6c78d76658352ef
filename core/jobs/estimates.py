"""How long a training will take: from the images/s earlier runs measured on this machine, else a rough guess."""
from __future__ import annotations

from core.jobs.runs import list_runs
from core.training.config import TrainConfig

# Rough images/s on 2 CPU cores at 224 px before any run has measured this machine (a frozen run's feature pass
# measured 59, a partial run's training 324 scaled to 224 px, on the 2-core machine of December 2026).
DEFAULT_SPEED = {"features": 50.0, "train": 6.0, "head": 5000.0, "partial": 300.0}
GPU_SPEEDUP = 25.0
CACHED_READ_SPEED = 2000.0  # feature vectors read back from the cache per second (photos hashed, shards loaded)


def input_shape(params: dict) -> tuple[int, float]:
    """(height px, width / height) a training with these params sees its photos at (mode defaults included)."""
    config = TrainConfig.from_params(params, "")
    return config.input_height, config.input_aspect


def _pixels(params: dict) -> float:
    """Input pixels of a training's photos, which its speed scales with."""
    height, aspect = input_shape(params)
    return float(height) ** 2 * float(aspect)


def measured_speeds(params: dict, on_gpu: bool) -> dict | None:
    """images/s per stage from the latest finished run with the same backbone, mode and device kind."""
    for run in list_runs():
        if run.params.get("backbone") != params.get("backbone") or run.params.get("mode") != params.get("mode"):
            continue
        speeds = run.extra.get("speeds") or {}
        if not speeds or bool(run.extra.get("on_gpu")) != on_gpu:
            continue
        scale = _pixels(run.params) / _pixels(params)
        return {stage: value * scale for stage, value in speeds.items() if value}
    return None


def _feature_inputs(params: dict) -> tuple:
    """What a frozen training's feature vectors depend on besides the photos: dataset, backbone, input and views."""
    config = TrainConfig.from_params(params, "")
    return (params.get("dataset_key"), config.backbone, config.weights, config.feature_set, config.input_height,
            round(float(config.input_aspect), 4), config.test_views)


def features_cached(params: dict) -> bool:
    """Whether an earlier frozen run on the same dataset already computed this frozen training's features (same
    backbone, weights, feature set, input and views): they are read back from the feature cache, not computed."""
    if params.get("mode") != "frozen" or not params.get("dataset_key"):
        return False
    wanted = _feature_inputs(params)
    return any(run.params.get("mode") == "frozen" and _feature_inputs(run.params) == wanted for run in list_runs())


def estimate_seconds(params: dict, n_train: int, n_valid: int, n_test: int, on_gpu: bool) -> tuple[float, bool]:
    """(seconds, measured): the duration of a training from this machine's measured images/s, else a rough guess."""
    from core.models.preprocess import TTA_VIEWS

    scale = 224 ** 2 / _pixels(params) * (GPU_SPEEDUP if on_gpu else 1.0)
    guessed = {stage: value * scale for stage, value in DEFAULT_SPEED.items()}
    speeds = measured_speeds(params, on_gpu)
    measured = speeds is not None
    if speeds is None:
        speeds = guessed
    config = TrainConfig.from_params(params, "")
    epochs = max(int(config.n_epochs), 1)
    features = speeds.get("features") or guessed["features"]
    views = len(TTA_VIEWS.get(config.test_views, ("plain",)))  # test-time views scored
    if config.mode == "frozen":
        if features_cached(params):
            features = CACHED_READ_SPEED
        head = max(speeds.get("train") or 0, DEFAULT_SPEED["head"]) if measured else DEFAULT_SPEED["head"]
        seconds = views * (n_train + n_valid + n_test) / features + epochs * (n_train + n_valid) / head
    elif config.mode == "partial":
        # The stage maps are computed once per photo in the stored views (those the store holds are read back); the
        # later stages train; valid is scored twice an epoch with weight averaging.
        from core.models.stage_store import STORE_VIEWS, stored_share

        photos = n_train + n_valid + n_test
        backbones = config.member_backbones
        missing = sum(photos * (1 - stored_share(backbone, config.weights, config.input_height, config.input_aspect,
                                                 photos)) for backbone in backbones)
        # A partial run measures the store's pass in photos/s, all stored views of a photo at once; the guess is one
        # view's images/s.
        maps_per_s = speeds["features"] if measured and speeds.get("features") else \
            guessed["features"] / len(STORE_VIEWS)
        train = speeds["train"] if measured and speeds.get("train") else guessed["partial"]
        scored = n_valid * (2 if config.ema_decay else 1) * len(STORE_VIEWS)
        one_run = epochs * (n_train / train + scored / (3 * train))
        # A refit: one run per backbone on train chooses the epoch, then each member trains on train and valid that
        # long without validating.
        member = config.expected_refit_epochs * (n_train + n_valid) / train if config.refit else one_run
        seconds = missing / maps_per_s + len(backbones) * photos * len(STORE_VIEWS) / (3 * train) \
            + len(backbones) * (config.ensemble * member + (one_run if config.refit else 0))
    else:
        train = speeds.get("train") or guessed["train"]
        evaluate = speeds.get("features") or 3 * train  # a forward pass costs about a third of a training step
        seconds = epochs * (n_train / train + n_valid / evaluate) + views * (n_valid + n_test) / evaluate
    return seconds, measured
