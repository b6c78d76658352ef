"""Choosing how a partial fine-tune runs: on stored stage maps (one model, or a seed ensemble of them saved as one
network), or, when the maps do not fit the store's budget or the photos are streamed from shards, with the frozen
stages run on every batch."""
from __future__ import annotations

from dataclasses import replace

import torch

from core.models import networks as models
from core.models import stage_store
from core.models.ensemble import ensemble_parts
from core.training.epochs import BaseRun, seed_everything
from core.training.modes import FinetuneRun
from core.training.partial import PartialRun, train_mode


class LivePartialRun(FinetuneRun):
    """Partial fine-tuning without stored maps: the photos stream as for a full fine-tune (augmented), the frozen
    stages run forward on each batch without gradients, and only the stages after the cut and the head learn."""

    def prepare(self, train_split, valid_split, test_split):
        from core.models.stages import Tail

        super().prepare(train_split, valid_split, test_split)
        for parameter in self.model.backbone.parameters():
            parameter.requires_grad_(False)
        self.tail = Tail(self.model.backbone, self.config.cut)
        for parameter in self.tail.trained_parameters():
            parameter.requires_grad_(True)

    def backbone_parameters(self):
        return self.tail.trained_parameters()

    def set_train_mode(self):
        train_mode(self.model, self.tail, self.config.batchnorm)


class _MemberProgress:
    """A member's progress as its share of the ensemble's bar, its messages prefixed with which member it is."""

    def __init__(self, progress, member: int, members: int):
        self.progress, self.member, self.members = progress, member, members

    def __call__(self, force: bool = False, **changes):
        if "fraction" in changes:
            changes["fraction"] = 0.95 * (self.member + changes["fraction"]) / self.members
        if changes.get("message"):
            changes["message"] = f"Model {self.member + 1} of {self.members}: {changes['message']}"
        self.progress(force=force, **changes)


class EnsembleRun(BaseRun):
    """`config.ensemble` partial fine-tunes with seeds seed, seed+1, … on the same stage maps (loaded once), each
    kept at its best valid epoch in members/N/; then one network of them all, calibrated once on valid, scored, and
    saved as model.pt."""

    def __init__(self, config, model, meta, device, out, log, progress, should_stop, generator, world=None,
                 make_model=None):
        super().__init__(config, model, meta, device, out, log, progress, should_stop, generator, world)
        self.make_model = make_model
        self.members: list[PartialRun] = []

    def fit(self, train_split, valid_split, test_split, resume_state) -> dict:
        if self.world.is_main:
            self.save_checkpoint(0)
        maps, results = None, []
        for k in range(self.config.ensemble):
            seed = self.config.seed + k
            folder = self.out / "members" / str(k + 1)
            folder.mkdir(parents=True, exist_ok=True)
            member_log = lambda line, k=k: self.log(f"[model {k + 1}/{self.config.ensemble}] {line}")
            run = PartialRun(replace(self.config, seed=seed, ensemble=1), self.model if k == 0 else self.make_model(),
                             self.meta, self.device, folder, member_log,
                             _MemberProgress(self.progress, k, self.config.ensemble), self.should_stop,
                             seed_everything(seed), self.world)
            run.shared_maps = maps
            member_state = _member_checkpoint(folder, member_log) if resume_state else None
            results.append(run.fit(train_split, valid_split, test_split, member_state))
            maps = run.tensors
            self.members.append(run)
        self.tensors = maps
        cut = self.config.cut
        backbone, head = ensemble_parts([run.model.backbone for run in self.members],
                                        [run.model.head for run in self.members], cut, self.meta["feature_dim"])
        self.model = models.CountingModel(backbone, head)
        self.meta = self.meta | {"ensemble": {"members": len(self.members), "cut": cut,
                                              "seeds": [self.config.seed + k for k in range(len(self.members))]}}
        self.temperature = self.calibrate(valid_split, self.meta)
        self.progress(force=True, stage="evaluate", fraction=0.97, message="Scoring the test split")
        valid_metrics = self.score("valid", valid_split)
        test_metrics = self.score("test", test_split)
        skipped = results[0]["skipped"]
        test_metrics["skipped"] = skipped
        self.log(f"ensemble of {len(self.members)}: valid balanced accuracy "
                 f"{valid_metrics['balanced_accuracy']:.3f} (members: "
                 + ", ".join(f"{r['valid']['balanced_accuracy']:.3f}" for r in results) + ")")
        return {"history": results[0]["history"], "best_epoch": results[0]["best_epoch"],
                "epochs_run": results[0]["epochs_run"], "temperature": self.temperature, "valid": valid_metrics,
                "test": test_metrics, "skipped": skipped,
                "members": [{"seed": self.config.seed + k, "best_epoch": r["best_epoch"], "history": r["history"],
                             "valid": _headline(r["valid"]), "test": _headline(r["test"])}
                            for k, r in enumerate(results)],
                **self.members[0].timings()}

    def save_checkpoint(self, epoch: int):
        """The ensemble's own checkpoint says what to resume (its settings); each member keeps its epochs' in
        members/N/checkpoint.pt, so a resumed ensemble (a requeued job, --resume) keeps the members it trained."""
        self.write_checkpoint({"epoch": epoch, "config": self.config.to_dict(), "meta": self.meta, "ensemble": True})

    def compute_logits(self, name, split):
        """The ensemble's output (log mean probability) per stored view, from each member's logits."""
        logits = torch.stack([run.map_logits(run.model, name) for run in self.members])
        combined = torch.logsumexp(logits.float().log_softmax(-1), 0) - torch.log(torch.tensor(float(len(logits))))
        return combined, self.tensors[name][1]


def _member_checkpoint(folder, log) -> dict | None:
    """A member's last epoch to resume from, or None to train it from the start (none written, or unreadable)."""
    path = folder / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log(f"its checkpoint cannot be read ({exc.__class__.__name__}): trained again from the start")
        return None


def _headline(metrics: dict) -> dict:
    return {key: metrics.get(key) for key in ("balanced_accuracy", "accuracy", "off_by_one", "mae", "n")}


def partial_run(config, model, meta, device, out, log, progress, should_stop, generator, world, train_split,
                photos: int, make_model):
    """The run for a partial fine-tune: on stored maps when they fit the store's budget, else live."""
    if not train_split.shards and stage_store.fits(model.backbone, meta, photos):
        if config.ensemble > 1:
            return EnsembleRun(config, model, meta, device, out, log, progress, should_stop, generator, world,
                               make_model=make_model)
        return PartialRun(config, model, meta, device, out, log, progress, should_stop, generator, world)
    if config.ensemble > 1:
        from core.training.config import TrainingError

        raise TrainingError("an ensemble trains on stored stage maps, and this dataset's do not fit the store's "
                            "budget (or it is read from shards): train one model (--ensemble 1)")
    why = "the photos are read from shards" if train_split.shards else (
        f"the stage maps of {photos:,} photos ({stage_store.store_bytes(model.backbone, meta, photos) / 1e9:.1f} GB) "
        f"do not fit the store's budget (the stage_maps cache cap)")
    log(f"partial fine-tuning without stored maps: {why}; the frozen stages run on every batch")
    return LivePartialRun(config, model, meta, device, out, log, progress, should_stop, generator, world)
