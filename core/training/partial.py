"""Partial fine-tuning: the backbone's last stages and the head train on the photos' stored stage maps (the early
stages run once per photo, in the stage-map store), several times faster per epoch than the whole network."""
from __future__ import annotations

import time

import torch

from core.models import networks as models
from core.models import stage_store
from core.models.inference import tempered_probabilities
from core.models.stages import STORE_CUT, Tail, block_index
from core.training.epochs import TensorRun, batch_correct

FEATURES_SHARE = 0.5  # of the progress bar, when the stage maps must be computed


def map_augment(maps: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Count-preserving changes of a batch of stage maps: a random top-bottom mirror ("vflip"), and with "crop" a
    random crop keeping all but up to two cells of each side (the tail is convolutional: any size passes)."""
    if kind == "none":
        return maps
    flip = torch.rand(len(maps), generator=generator) < 0.5
    maps = torch.where(flip[:, None, None, None], maps.flip(-2), maps)
    if kind == "vflip+crop":
        height, width = maps.shape[-2:]
        top, left = (int(torch.randint(0, 3, (1,), generator=generator)) for _ in range(2))
        bottom, right = (int(torch.randint(0, 3, (1,), generator=generator)) for _ in range(2))
        maps = maps[..., top:height - bottom, left:width - right]
    return maps


def train_mode(model: torch.nn.Module, tail: Tail, batchnorm: str) -> None:
    """The stages before the cut in eval mode (their ImageNet batch-norm statistics stay), the head and the stages
    after it training; with batchnorm "frozen" these keep ImageNet's statistics too (dropout and drop-path act)."""
    model.eval()
    model.head.train()
    for module in tail.trained_modules():
        for inner in module.modules():
            inner.training = batchnorm == "train" or not isinstance(inner, torch.nn.modules.batchnorm._BatchNorm)


def stage_map_logits(model: torch.nn.Module, maps: torch.Tensor, cut: str,
                     device: torch.device | str = "cpu", batch_size: int = 128) -> torch.Tensor:
    """`model`'s logits from its stage maps after `cut` (n × views × C × H × W): n × views × classes, on the CPU.
    Only the model's stages after the cut and its head run."""
    tail = Tail(model.backbone, cut)
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(maps), batch_size):
            batch = maps[start:start + batch_size]
            logits = model.head(tail(batch.flatten(0, 1).to(device).float())).float().cpu()
            out.append(logits.view(len(batch), batch.shape[1], -1))
    return torch.cat(out)


class PartialRun(TensorRun):
    """The stages after `config.cut` and the head train on stage maps; the stages before it stay frozen.

    The maps after the store's cut (blocks.4) come from the stage-map store, computed there once in the stored views
    (plain and left-right mirrored); a later cut runs the frozen blocks in between once, in memory. Each epoch sees
    every training photo in one of its views. The kept model is the whole network, so everything that reads a model
    file reads it as it reads a fine-tuned one.
    """

    shared_maps: dict | None = None  # set by an ensemble: its members train on the maps loaded once

    def prepare(self, train_split, valid_split, test_split):
        self.splits = {"train": train_split, "valid": valid_split, "test": test_split}
        self.cut = self.config.cut
        self.model.to(self.device)
        for parameter in self.model.backbone.parameters():
            parameter.requires_grad_(False)
        self.tail = Tail(self.model.backbone, self.cut)
        for parameter in self.tail.trained_parameters():
            parameter.requires_grad_(True)
        self.tensors = self.shared_maps if self.shared_maps is not None else self.load_maps()

    def load_maps(self) -> dict:
        """Per split (maps n × views × C × H × W at the cut, fp16; labels), from the store (computing what it lacks)."""
        paths = [p for split in self.splits.values() for p in split.paths]

        def report(state):
            self.progress(stage="features", fraction=FEATURES_SHARE * state["done"] / max(state["total"], 1),
                          images_per_s=state["images_per_s"], data_wait_fraction=state["data_wait_fraction"],
                          message=f"stage maps of {state['done']:,}/{state['total']:,} photos (once per photo; "
                                  f"kept for the next training)")

        self.progress(force=True, stage="features", message="Reading stored stage maps")
        started = time.perf_counter()
        found = stage_store.stage_maps(self.model.backbone, self.meta, paths, device=self.device,
                                       batch_size=64 if self.device.type == "cuda" else 32,
                                       num_workers=self.config.num_workers, on_progress=report,
                                       should_stop=self.should_stop)
        self.log(f"stage maps after {STORE_CUT}: {found.hits} stored, {found.computed} computed in "
                 f"{found.seconds:.1f} s" + (f" ({found.computed / found.seconds:.1f} photos/s)" if found.computed else ""))
        self.map_seconds, self.map_hits, self.maps_computed = time.perf_counter() - started, found.hits, found.computed
        for i, reason in found.errors.items():
            self.skipped[paths[i]] = reason
        stacked = torch.stack([found.maps[view] for view in stage_store.STORE_VIEWS], 1)
        del found
        stacked = self._advance(stacked)
        tensors, offset = {}, 0
        for name, split in self.splits.items():
            keep = [i for i in range(offset, offset + len(split.paths)) if paths[i] not in self.skipped]
            tensors[name] = (stacked[keep], torch.as_tensor(split.labels[[i - offset for i in keep]], dtype=torch.long))
            offset += len(split.paths)
        return tensors

    def _advance(self, stacked: torch.Tensor) -> torch.Tensor:
        """Maps at the store's cut carried to this run's cut through the frozen blocks in between (once, in memory)."""
        start, stop = block_index(STORE_CUT) + 1, block_index(self.cut) + 1
        if start >= stop:
            return stacked
        self.progress(force=True, stage="features", fraction=FEATURES_SHARE,
                      message=f"Running the frozen blocks up to {self.cut} on the stored maps")
        n, views = stacked.shape[:2]
        flat = stacked.flatten(0, 1)
        out = []
        with torch.inference_mode(), stage_store.evaluating(self.model):
            for first in range(0, len(flat), 256):
                batch = flat[first:first + 256].to(self.device).float()
                out.append(self.tail.blocks_after(batch, start, stop).to(torch.float16).cpu())
        advanced = torch.cat(out)
        return advanced.view(n, views, *advanced.shape[1:])

    def backbone_parameters(self):
        return self.tail.trained_parameters()

    def train_epoch(self, epoch):
        maps, labels = self.tensors["train"]
        n = len(labels)
        order = self.epoch_order()
        train_mode(self.model, self.tail, self.config.batchnorm)
        total_loss, correct, seen, started = 0.0, 0, 0, time.perf_counter()
        steps = self.steps_per_epoch()
        for step, start in enumerate(range(0, n, self.config.batch_size), 1):
            self.check_stop(f"epoch {epoch} step {step}")
            batch = order[start:start + self.config.batch_size]
            if len(batch) == 1 and n > 1:
                continue  # batch norm cannot train on one photo; it is in another batch next epoch
            views = maps.shape[1]
            pick = torch.randint(0, views, (len(batch),), generator=self.generator) if self.config.augment \
                else torch.zeros(len(batch), dtype=torch.long)
            x = maps[batch, pick].to(self.device).float()
            if self.config.augment:
                x = map_augment(x, self.config.map_augment, self.generator)
            y = labels[batch].to(self.device)
            logits = self.model.head(self.tail(x))
            loss = self.criterion(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.averaged is not None:
                self.averaged.update_parameters(self.model)
            total_loss += loss.item() * len(batch)
            correct += batch_correct(logits, y)
            seen += len(batch)
            elapsed = time.perf_counter() - started
            self.progress(fraction=FEATURES_SHARE + (0.95 - FEATURES_SHARE) * self.fraction(epoch, step / steps),
                          train_loss=total_loss / max(seen, 1), train_acc=correct / max(seen, 1),
                          images_per_s=seen / max(elapsed, 1e-9), data_wait_fraction=0.0,
                          message=f"Epoch {epoch}/{self.config.n_epochs}, batch {step}/{steps}")
        seconds = time.perf_counter() - started
        return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                "images_per_s": seen / max(seconds, 1e-9), "data_wait_fraction": 0.0, "seconds": seconds}

    def map_logits(self, model: torch.nn.Module, name: str) -> torch.Tensor:
        """`model`'s logits on a split's stored maps, n × views × classes, on the CPU."""
        maps, _ = self.tensors[name]
        if not len(maps):
            return torch.zeros(0, maps.shape[1], len(self.meta["classes"]))
        return stage_map_logits(model, maps, self.cut, self.device)

    def _validate(self, model):
        labels = self.tensors["valid"][1]
        if not len(labels):
            return {"valid_loss": None, "valid_acc": None}
        logits = self.map_logits(model, "valid")
        loss = float(self.eval_criterion(logits[:, 0].to(self.device), labels.to(self.device)))
        probs = tempered_probabilities(logits)
        return {"valid_loss": loss, "valid_acc": float((probs.argmax(1) == labels).float().mean())}

    def compute_logits(self, name, split):
        return self.map_logits(self.model, name), self.tensors[name][1]

    def timings(self):
        return {"feature_seconds": round(getattr(self, "map_seconds", 0.0), 2),
                "feature_cache_hits": getattr(self, "map_hits", 0),
                "features_computed": getattr(self, "maps_computed", 0)}


class RefitRun(PartialRun):
    """A partial fine-tune on the train and valid photos together, kept after epoch `stop_after` of its schedule (the
    epoch a run on train alone chose on valid). Valid is in its training data, so it chooses nothing: each epoch's
    weights replace the last, and the run ends at that epoch."""

    def prepare(self, train_split, valid_split, test_split):
        super().prepare(train_split, valid_split, test_split)
        self.stored = self.tensors  # the maps per split, as the next run shares them
        (train_maps, train_labels), (valid_maps, valid_labels) = self.tensors["train"], self.tensors["valid"]
        self.tensors = self.tensors | {"train": (torch.cat([train_maps, valid_maps]),
                                                 torch.cat([train_labels, valid_labels]))}
        self.log(f"refit: trains on {len(train_labels) + len(valid_labels)} photos (train {len(train_labels)} + "
                 f"valid {len(valid_labels)}) for the {self.stop_after} epoch{'s' if self.stop_after != 1 else ''} "
                 f"valid chose")

    def fit(self, train_split, valid_split, test_split, resume_state) -> dict:
        result = super().fit(train_split, valid_split, test_split, resume_state)
        self.tensors = self.stored  # the joined copy of train and valid is not kept once trained
        return result

    def validate_epoch(self):
        return {"valid_loss": None, "valid_acc": None}

    def calibrate(self, valid_split, best_meta: dict) -> float:
        """No temperature: valid is in this run's training data (the ensemble is calibrated on held-out predictions)."""
        self.log("calibration: none for this model alone (valid is in its training data), temperature 1")
        if self.world.is_main:
            models.save_model(self.out / "model.pt", self.model, best_meta | {"temperature": 1.0})
        return 1.0
