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
from core.training.partial import PartialRun, RefitRun, train_mode


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
    """A member's progress as its share of the ensemble's bar (from `start`, `share` wide), its messages prefixed with
    which member it is."""

    def __init__(self, progress, start: float, share: float, name: str):
        self.progress, self.start, self.share, self.name = progress, start, share, name

    def __call__(self, force: bool = False, **changes):
        if "fraction" in changes:
            changes["fraction"] = 0.95 * (self.start + self.share * changes["fraction"])
        if changes.get("message"):
            changes["message"] = f"{self.name}: {changes['message']}"
        self.progress(force=force, **changes)


class EnsembleRun(BaseRun):
    """`config.ensemble` partial fine-tunes per backbone (`config.member_backbones`) with seeds seed, seed+1, …, on
    the same stage maps (loaded once per backbone), each kept at its best valid epoch in members/N/; then one network of
    them all, calibrated once on valid, scored, and saved as model.pt.

    With `config.refit`, a run per backbone on train alone (in choosing/BACKBONE/) chooses the epoch on valid, and
    the members train on train and valid together up to that epoch. Valid being in their training data, the choosing
    runs' valid predictions (averaged) calibrate the ensemble and are its valid figures.
    """

    def __init__(self, config, model, meta, device, out, log, progress, should_stop, generator, world=None,
                 make_model=None):
        super().__init__(config, model, meta, device, out, log, progress, should_stop, generator, world)
        self.make_model = make_model  # backbone name → (a fresh model, its meta)
        self.members: list[PartialRun] = []
        self.choosers: list[PartialRun] = []

    def _runs(self) -> list[tuple[str, int | None, str, int]]:
        """(kind: "choose" or "member", the seed, the backbone, the folder's number) of every run, in order."""
        runs, number = [], 0
        for backbone in self.config.member_backbones:
            if self.config.refit:
                runs.append(("choose", self.config.seed, backbone, 0))
            for k in range(self.config.ensemble):
                number += 1
                runs.append(("member", self.config.seed + k, backbone, number))
        return runs

    def _epochs(self, kind: str, backbone: str, chosen_epoch: dict) -> int:
        """The epochs a run trains, which weigh its share of the progress bar (an epoch takes about as long in each:
        a refit member's photos are a choosing run's train photos plus the valid ones it scores every epoch). Until
        the choosing run has chosen, a refit member is counted at the epochs valid is expected to choose."""
        if kind == "member" and self.config.refit:
            return chosen_epoch.get(backbone) or self.config.expected_refit_epochs
        return self.config.n_epochs

    def fit(self, train_split, valid_split, test_split, resume_state) -> dict:
        if self.world.is_main:
            self.save_checkpoint(0)
        runs = self._runs()
        maps_of, chosen_epoch, results, kinds = {}, {}, [], []
        total = self.config.ensemble * len(self.config.member_backbones)
        for index, (kind, seed, backbone, number) in enumerate(runs):
            folder = self.out / ("choosing" if kind == "choose" else "members") / (backbone if kind == "choose"
                                                                                    else str(number))
            folder.mkdir(parents=True, exist_ok=True)
            name = f"Choosing the epoch on valid ({backbone})" if kind == "choose" else f"Model {number} of {total}"
            tag = f"choosing run, {backbone}" if kind == "choose" else f"model {number}/{total}"
            member_log = lambda line, tag=tag: self.log(f"[{tag}] {line}")
            model, meta = (self.model, self.meta) if index == 0 else self.make_model(backbone)
            config = replace(self.config, seed=seed, ensemble=1, backbone=backbone, also_backbone=None, refit=False)
            run_class = RefitRun if kind == "member" and self.config.refit else PartialRun
            epochs = [self._epochs(other, on, chosen_epoch) for other, _, on, _ in runs]
            bar = _MemberProgress(self.progress, sum(epochs[:index]) / sum(epochs), epochs[index] / sum(epochs), name)
            run = run_class(config, model, meta, self.device, folder, member_log, bar, self.should_stop,
                            seed_everything(seed), self.world)
            if run_class is RefitRun:
                run.stop_after = chosen_epoch[backbone]
            run.shared_maps = maps_of.get(backbone)
            member_state = _member_checkpoint(folder, member_log) if resume_state else None
            result = run.fit(train_split, valid_split, test_split, member_state)
            maps_of[backbone] = run.tensors  # a refit run is back on the shared maps once it has trained
            if kind == "choose":
                chosen_epoch[backbone] = result["best_epoch"]
                member_log(f"valid chose epoch {result['best_epoch']}: the members train on train and valid up to it")
                self.choosers.append(run)
            else:
                results.append(result)
                kinds.append(backbone)
                self.members.append(run)
        self.tensors = maps_of[self.config.backbone]
        cut = self.config.cut
        several = len(self.config.member_backbones) > 1
        backbone, head = ensemble_parts([run.model.backbone for run in self.members],
                                        [run.model.head for run in self.members], cut,
                                        [run.meta["feature_dim"] for run in self.members], kinds if several else None)
        self.model = models.CountingModel(backbone, head)
        self.meta = self.meta | {"ensemble": {"members": len(self.members), "cut": cut,
                                              "seeds": [run.config.seed for run in self.members],
                                              **({"backbones": kinds} if several else {}),
                                              **({"refit_epochs": chosen_epoch} if self.config.refit else {})}}
        self.temperature = self.calibrate(valid_split, self.meta)
        self.progress(force=True, stage="evaluate", fraction=0.97, message="Scoring the test split")
        valid_metrics = self.score("valid", valid_split)
        test_metrics = self.score("test", test_split)
        skipped = results[0]["skipped"]
        test_metrics["skipped"] = skipped
        self.log(f"ensemble of {len(self.members)}: valid balanced accuracy {valid_metrics['balanced_accuracy']:.3f}"
                 + (" (of the choosing runs on train alone: the members learnt from valid)" if self.config.refit else
                    " (members: " + ", ".join(f"{r['valid']['balanced_accuracy']:.3f}" for r in results) + ")"))
        return {"history": results[0]["history"], "best_epoch": results[0]["best_epoch"],
                "epochs_run": results[0]["epochs_run"], "temperature": self.temperature, "valid": valid_metrics,
                "test": test_metrics, "skipped": skipped,
                "members": [{"seed": run.config.seed, "backbone": run.config.backbone, "best_epoch": r["best_epoch"],
                             "history": r["history"], "valid": None if self.config.refit else _headline(r["valid"]),
                             "test": _headline(r["test"])}
                            for run, r in zip(self.members, results)],
                **({"refit_epochs": chosen_epoch} if self.config.refit else {}),
                **self.members[0].timings()}

    def save_checkpoint(self, epoch: int):
        """The ensemble's own checkpoint says what to resume (its settings); each member keeps its epochs' in
        members/N/checkpoint.pt, so a resumed ensemble (a requeued job, --resume) keeps the members it trained."""
        self.write_checkpoint({"epoch": epoch, "config": self.config.to_dict(), "meta": self.meta, "ensemble": True})

    def compute_logits(self, name, split):
        """The ensemble's output (log mean probability) per stored view, from each member's logits; on valid after a
        refit, the choosing runs' (the members learnt from valid)."""
        runs = self.choosers if self.config.refit and name == "valid" else self.members
        logits = torch.stack([run.map_logits(run.model, name) for run in runs])
        combined = torch.logsumexp(logits.float().log_softmax(-1), 0) - torch.log(torch.tensor(float(len(logits))))
        return combined, runs[0].tensors[name][1]


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
    several = config.ensemble * len(config.member_backbones) > 1 or config.refit
    others = sum(stage_store.planned_bytes(name, None, config.input_height, config.input_aspect, photos)
                 for name in config.member_backbones if name != config.backbone)
    if not train_split.shards and stage_store.fits(model.backbone, meta, photos, also=others):
        if several:
            return EnsembleRun(config, model, meta, device, out, log, progress, should_stop, generator, world,
                               make_model=make_model)
        return PartialRun(config, model, meta, device, out, log, progress, should_stop, generator, world)
    if several:
        from core.training.config import TrainingError

        raise TrainingError("an ensemble trains on stored stage maps, and this dataset's do not fit the store's "
                            "budget (or it is read from shards): train one model (--ensemble 1, no second backbone, "
                            "no refit)")
    why = "the photos are read from shards" if train_split.shards else (
        f"the stage maps of {photos:,} photos ({stage_store.store_bytes(model.backbone, meta, photos) / 1e9:.1f} GB) "
        f"do not fit the store's budget (the stage_maps cache cap)")
    log(f"partial fine-tuning without stored maps: {why}; the frozen stages run on every batch")
    return LivePartialRun(config, model, meta, device, out, log, progress, should_stop, generator, world)
