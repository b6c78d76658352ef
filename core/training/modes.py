"""The two ways to train: a head on cached frozen-backbone features, or fine-tuning the whole network on photos."""
from __future__ import annotations

import os
import time

import torch

from core.models.inference import tempered_probabilities, view_logits
from core.models.preprocess import (
    TTA_VIEWS,
    PhotoDataset,
    default_workers,
    eval_transform,
    train_transform,
    tta_views,
)
from core.training import distributed
from core.training.epochs import BaseRun, TensorRun, batch_correct
from core.training.losses import balanced_sampler


class FrozenRun(TensorRun):
    """Backbone frozen: features computed once (or read from the cache), then only the head trains."""

    frozen = True
    FEATURES_SHARE = 0.85  # of the progress bar, when features must be computed

    def prepare(self, train_split, valid_split, test_split):
        self.splits = {"train": train_split, "valid": valid_split, "test": test_split}
        views = TTA_VIEWS[self.config.test_views]
        distributed.prepare_for_tests(self.model)
        started = time.perf_counter()
        if train_split.shards:
            self.tensors = self._streamed_tensors(views, started)
        else:
            self.tensors = self._folder_tensors(views, started)
        self.model.backbone.to(self.device).eval()
        self.model.head.to(self.device)

    def _feature_batch(self) -> int:
        return 128 if self.device.type == "cuda" else 32

    def _folder_tensors(self, views, started) -> dict:
        """Per split (features n × views × dim, labels) of its photo files, one feature pass per view."""
        from core.models.features import extract_features

        paths = [p for split in self.splits.values() for p in split.paths]
        self.features = {}
        for n, view in enumerate(views):
            named = "" if view == "plain" else f" ({view})"

            def report(state, n=n, named=named):
                within = (n + state["done"] / state["total"]) / len(views)
                self.progress(stage="features", fraction=self.FEATURES_SHARE * within,
                              images_per_s=state["images_per_s"], data_wait_fraction=state["data_wait_fraction"],
                              message=f"Computing features {state['done']}/{state['total']}{named}")

            self.progress(force=True, stage="features", message="Reading cached features")
            result = extract_features(self.model.backbone, self.meta, paths, device=self.device,
                                      batch_size=self._feature_batch(), num_workers=self.config.num_workers,
                                      view=view, on_progress=report, should_stop=self.should_stop)
            if result.computed:
                # Throttled reports can all fall inside one interval on a small set: always report the final speed.
                self.progress(force=True, stage="features", fraction=self.FEATURES_SHARE * (n + 1) / len(views),
                              images_per_s=result.computed / max(result.seconds, 1e-9),
                              message=f"Computed features of {result.computed} photos")
            self.log(f"features{named}: {result.hits} from the cache, {result.computed} computed "
                     f"in {result.seconds:.1f} s" + (f" ({result.computed / result.seconds:.1f} img/s)" if result.computed else ""))
            for i, reason in result.errors.items():
                self.skipped[paths[i]] = reason
            self.features[view] = result.features
            self.feature_seconds = time.perf_counter() - started
            self.cache_hits, self.computed = result.hits, result.computed
        # Split the feature rows back per split, dropping unreadable photos.
        tensors = {}
        offset = 0
        for name, split in self.splits.items():
            rows = range(offset, offset + len(split.paths))
            keep = [i for i in rows if paths[i] not in self.skipped]
            tensors[name] = (torch.stack([self.features[v][keep] for v in views], 1) if keep
                             else torch.zeros(0, len(views), self.meta["feature_dim"]),
                             torch.as_tensor(split.labels[[i - offset for i in keep]], dtype=torch.long))
            offset += len(split.paths)
        return tensors

    def _streamed_tensors(self, views, started) -> dict:
        """Per split (features n × views × dim, labels) of a shard set: each split's shards read once for all views,
        rows in the split's photo order; photos whose count has no class left out, unreadable ones skipped."""
        import webdataset as wds

        from core.data.remote.shard_store import open_store, read_complete_index
        from core.data.remote.streaming import photo_stream
        from core.models.features import extract_stream_features

        store = open_store(self.splits["train"].shards)
        index = read_complete_index(store)
        total = sum(len(split.paths) for split in self.splits.values())
        named = "" if views == ("plain",) else f" ({', '.join(views)})"
        tensors, before = {}, 0
        self.cache_hits = self.computed = 0
        self.progress(force=True, stage="features", message="Reading cached features")
        for name, split in self.splits.items():
            empty = (torch.zeros(0, len(views), self.meta["feature_dim"]), torch.zeros(0, dtype=torch.long))
            if not split.paths:
                tensors[name] = empty
                continue

            def report(state, before=before, name=name):
                self.progress(stage="features", fraction=self.FEATURES_SHARE * (before + state["done"]) / total,
                              images_per_s=state["images_per_s"], data_wait_fraction=state["data_wait_fraction"],
                              message=f"Features of the {name} split {state['done']}/{state['total']}{named}")

            wanted = split.class_index
            stream = wds.DataPipeline(photo_stream(store, name, self.config.on_bad_shard, index=index),
                                      wds.select(lambda sample, wanted=wanted: sample["count"] in wanted))
            result = extract_stream_features(self.model.backbone, self.meta, stream, views, device=self.device,
                                             batch_size=self._feature_batch(), num_workers=self.config.num_workers,
                                             total=len(split.paths), on_progress=report,
                                             should_stop=self.should_stop)
            speed = f" ({result.computed / result.seconds:.1f} img/s)" if result.computed else ""
            self.log(f"features of the {name} split{named}: {result.hits} from the cache, {result.computed} computed "
                     f"in {result.seconds:.1f} s{speed}")
            self.skipped.update(result.errors)
            unread = len(split.paths) - len(result.names) - len(result.errors)
            if unread > 0:
                self.log(f"{name} split: {unread} photos not read (in damaged shards that were skipped)")
            # Streamed photos arrive in the order the workers deliver them: put them in the split's order.
            position = {photo: i for i, photo in enumerate(split.paths)}
            order = sorted(range(len(result.names)), key=lambda row: position.get(result.names[row], len(position)))
            labels = torch.tensor([wanted[result.counts[row]] for row in order], dtype=torch.long)
            tensors[name] = (torch.stack([result.features[v][order] for v in views], 1), labels) if order else empty
            self.cache_hits += result.hits
            self.computed += result.computed
            before += len(split.paths)
        self.feature_seconds = time.perf_counter() - started
        if self.computed:
            self.progress(force=True, stage="features", fraction=self.FEATURES_SHARE,
                          images_per_s=self.computed / max(self.feature_seconds, 1e-9),
                          message=f"Computed features of {self.computed} photos")
        return tensors

    def train_epoch(self, epoch):
        features, labels = self.tensors["train"]
        n = len(labels)
        order = self.epoch_order()
        self.model.head.train()
        total_loss, correct, started = 0.0, 0, time.perf_counter()
        for start in range(0, n, self.config.batch_size):
            batch = order[start:start + self.config.batch_size]
            if len(batch) == 1 and n > 1:
                continue  # a batch-norm head cannot train on one photo; it is in another batch next epoch
            x = features[batch]
            # With mirrored views cached, each photo is seen in one of its views at random.
            pick = torch.randint(0, x.shape[1], (len(batch),), generator=self.generator) if self.config.augment else torch.zeros(len(batch), dtype=torch.long)
            x = x[torch.arange(len(batch)), pick].to(self.device)
            y = labels[batch].to(self.device)
            logits = self.model.head(x)
            loss = self.criterion(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.item() * len(batch)
            correct += batch_correct(logits, y)
        seconds = time.perf_counter() - started
        self.progress(fraction=self.FEATURES_SHARE + (1 - self.FEATURES_SHARE - 0.03) * epoch / self.config.n_epochs)
        return {"train_loss": total_loss / max(n, 1), "train_acc": correct / max(n, 1),
                "images_per_s": n / max(seconds, 1e-9), "data_wait_fraction": 0.0, "seconds": seconds}

    def head_logits(self, name: str) -> torch.Tensor:
        """The head's logits on a split's cached features, n × views × classes, on the CPU."""
        features, _ = self.tensors[name]
        self.model.head.eval()
        with torch.no_grad():
            views = [self.model.head(features[:, v].to(self.device)).float() for v in range(features.shape[1])]
        return torch.stack(views, 1).cpu()

    def compute_logits(self, name, split):
        return self.head_logits(name), self.tensors[name][1]

    def validate_epoch(self):
        _, labels = self.tensors["valid"]
        if not len(labels):
            return {"valid_loss": None, "valid_acc": None}
        self.model.head.eval()
        with torch.no_grad():
            logits = self.model.head(self.tensors["valid"][0][:, 0].to(self.device))
            loss = float(self.eval_criterion(logits, labels.to(self.device)))
        probs = tempered_probabilities(self.head_logits("valid"))
        return {"valid_loss": loss, "valid_acc": float((probs.argmax(1) == labels).float().mean())}

    def timings(self):
        return {"feature_seconds": round(self.feature_seconds, 2), "feature_cache_hits": self.cache_hits,
                "features_computed": self.computed}


class FinetuneRun(BaseRun):
    """The whole network trains on augmented photos; the backbone at a lower learning rate.

    With several processes the model is wrapped in DistributedDataParallel: each rank trains on its share of the
    photos (a seeded DistributedSampler, or its shards), gradients are averaged, and each rank scores a disjoint
    slice of the valid and test photos, gathered so that every photo counts once.
    """

    def prepare(self, train_split, valid_split, test_split):
        cuda = self.device.type == "cuda"
        # channels_last speeds up GPU training; on CPU its backward pass measured slower, so only there.
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.model.to(self.device).to(memory_format=self.memory_format)
        distributed.prepare_for_tests(self.model)
        self.net = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        workers = default_workers() if self.config.num_workers is None else self.config.num_workers
        self.workers = workers
        transform = train_transform(self.meta) if self.config.augment else eval_transform(self.meta)
        self.train_split, self.valid_split = train_split, valid_split
        self.sampler = None
        self.seen: list[str] = []
        self.record_seen = bool(os.environ.get(distributed.TEST_DUMP_ENV))
        batch = self.config.batch_size
        if train_split.shards:
            from core.data.remote.streaming import training_stream

            stream = training_stream(train_split.shards, transform, train_split.class_index, batch, workers,
                                     on_bad_shard=self.config.on_bad_shard, seed=self.config.seed,
                                     first_epoch=self.first_epoch)
            self.train_loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers,
                                                            persistent_workers=workers > 0, pin_memory=cuda)
            self.train_names = None  # streamed batches carry their photos' keys
        else:
            train_set = PhotoDataset(train_split.paths, train_split.labels, transform)
            if self.config.balance == "sampler":  # validate() keeps it to one process
                self.sampler = balanced_sampler(train_split.labels, self.generator)
                per_rank = len(train_set)
            else:
                # One seeded order per epoch, each rank taking every world-size-th photo of it: one process with
                # batch B sees the same photos per step as N processes with batch B / N each.
                self.sampler = torch.utils.data.DistributedSampler(
                    train_set, num_replicas=self.world.size, rank=self.world.rank, shuffle=True, seed=self.config.seed)
                per_rank = self.sampler.num_samples
            self.train_loader = torch.utils.data.DataLoader(
                train_set, batch_size=batch, sampler=self.sampler, num_workers=workers,
                persistent_workers=workers > 0, pin_memory=cuda, generator=self.generator,
                drop_last=per_rank % batch == 1)  # BatchNorm cannot train on a batch of one
            self.train_names = train_split.paths
        self.valid_loader = self._eval_loader(valid_split, workers)

    def _eval_loader(self, split, workers):
        """(loader, names) over this rank's share of a split: names maps a batch's indices to photos (None: the
        batch carries the streamed photos' keys); (None, None) when the split is empty."""
        if not split.paths:
            return None, None
        cuda = self.device.type == "cuda"
        if split.shards:
            from core.data.remote.streaming import eval_stream

            stream = eval_stream(split.shards, eval_transform(self.meta), split.class_index, split.name,
                                 self.config.on_bad_shard)
            return torch.utils.data.DataLoader(stream, batch_size=self.config.batch_size, num_workers=workers,
                                               pin_memory=cuda), None
        share = self.world.eval_slice(len(split.paths))
        names = split.paths[share.start:share.stop]
        photos = PhotoDataset(names, split.labels[share.start:share.stop], eval_transform(self.meta))
        return torch.utils.data.DataLoader(photos, batch_size=self.config.batch_size, num_workers=workers,
                                           pin_memory=cuda), names

    def train_labels(self):
        return self.train_split.labels

    def steps_per_epoch(self):
        return max(1, len(self.train_loader))

    def _batch(self, images, labels, errors, ids, names):
        """Move a batch to the device, dropping (and recording) photos that could not be read."""
        photos = list(ids) if names is None else [names[i] for i in ids.tolist()]
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        for photo, error in zip(photos, errors):
            if error:
                self.skipped[photo] = error
        images, labels = images[ok], labels[ok]
        images = images.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True), [p for p, good in zip(photos, ok) if good]

    def set_train_mode(self):
        self.net.train()

    def train_epoch(self, epoch):
        self.set_train_mode()
        if isinstance(self.sampler, torch.utils.data.DistributedSampler):
            self.sampler.set_epoch(epoch)
        total_loss, correct, seen, wait = 0.0, 0, 0, 0.0
        started = tick = time.perf_counter()
        steps = len(self.train_loader)
        cuda = self.device.type == "cuda"
        for step, (images, labels, ids, errors) in enumerate(self.train_loader, 1):
            wait += time.perf_counter() - tick
            self.check_stop(f"epoch {epoch} step {step}")
            distributed.test_hooks(self.world, step, self)
            images, labels, photos = self._batch(images, labels, errors, ids, self.train_names)
            # Every rank must take the step together (DDP averages gradients in backward).
            if self.world.all_agree(len(labels) > 1):
                with torch.autocast("cuda", enabled=cuda):
                    logits = self.net(images)
                    loss = self.criterion(logits, labels)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.averaged is not None:
                    self.averaged.update_parameters(self.model)
                total_loss += loss.item() * len(labels)
                correct += batch_correct(logits, labels)
                seen += len(labels)
                if self.record_seen:
                    self.seen += [str(p) for p in photos]
            self.scheduler.step()
            elapsed = time.perf_counter() - started
            self.progress(fraction=0.95 * self.fraction(epoch, step / steps), train_loss=total_loss / max(seen, 1),
                          train_acc=correct / max(seen, 1), images_per_s=self.world.size * seen / max(elapsed, 1e-9),
                          data_wait_fraction=wait / max(elapsed, 1e-9),
                          message=f"Epoch {epoch}/{self.config.n_epochs}, batch {step}/{steps}")
            tick = time.perf_counter()
        elapsed = time.perf_counter() - started
        self.world.average_buffers(self.model)
        if self.averaged is not None:  # its batch-norm statistics were averaged from each rank's own
            self.world.average_buffers(self.averaged.module)
        total_loss, correct, seen = self.world.sums(total_loss, correct, seen)
        return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                "images_per_s": seen / max(elapsed, 1e-9), "data_wait_fraction": wait / max(elapsed, 1e-9),
                "seconds": elapsed}

    def _eval_batches(self, loader, names, model=None):
        """This rank's readable (images, labels) of an evaluation loader, `model` (default: the trained network) in
        eval mode, without gradients. Ranks may hold one batch more or less, so no collective (a stop check) is made
        per batch."""
        (model or self.net).eval()
        with torch.inference_mode():
            for images, labels, ids, errors in (loader if loader is not None else []):
                if not self.world.distributed:
                    self.check_stop()
                images, labels, _ = self._batch(images, labels, errors, ids, names)
                if len(labels):
                    yield images, labels

    def _validate(self, model):
        loader, names = self.valid_loader
        if loader is None:
            return {"valid_loss": None, "valid_acc": None}
        total_loss, correct, seen = 0.0, 0, 0
        for images, labels in self._eval_batches(loader, names, model):
            with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                logits = model(images)
            total_loss += float(self.eval_criterion(logits.float(), labels)) * len(labels)
            correct += batch_correct(logits, labels)
            seen += len(labels)
        total_loss, correct, seen = self.world.sums(total_loss, correct, seen)
        return {"valid_loss": total_loss / max(seen, 1), "valid_acc": correct / max(seen, 1)}

    def compute_logits(self, name, split):
        """Per-view logits of a split's photos (the model's test-time views), unreadable photos left out; with
        several processes each rank scores its share and all receive the whole split, in split order."""
        loader, names = self.valid_loader if name == "valid" else self._eval_loader(split, self.workers)
        views = tta_views(self.meta)
        n_classes = len(self.meta["classes"])
        logits, labels = [torch.zeros(0, len(views), n_classes)], [torch.zeros(0, dtype=torch.long)]
        for images, batch_labels in self._eval_batches(loader, names):
            with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                logits.append(view_logits(self.model, images, views).float().cpu())
            labels.append(batch_labels.cpu())
            self.progress(message=f"Scoring the {name} split {sum(map(len, labels))}/{len(split.paths)}")
        shares = self.world.gather((torch.cat(logits), torch.cat(labels)))
        return torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
