"""Where a training batch's image features come from (training.py's `features(batch) -> (g, P)`).

- `TowerFeatures`: one frozen visual pass per batch, under the training precision's autocast.
- `CachedTowerFeatures` (--cache-image-features): rows stored by an earlier epoch or run are read from
  the feature cache by the DataLoader workers; only the other rows go through the tower, and their
  outputs are queued for storing.

Both are called the same way: `features(batch) -> (g, P)`, `commit()` before a checkpoint, `close()` at
the end. `TrainCollate` builds a batch (and its token ids) in the DataLoader workers.
"""
from __future__ import annotations

from pathlib import Path

import torch

import precision as prec
from datasets import collate
from distributed import DistInfo, all_gather_object
from errors import ConfigError, UserError
from logs import get_logger
from train_cache import CacheReader, CachedRowsDataset, FeatureCache, cache_meta, collate_cached, prepare_cache

log = get_logger("train_features")



class TrainCollate:
    """Stacks images and builds the regularisation loss's token ids in the DataLoader workers."""

    def __init__(self, prompts, cache_reader: CacheReader | None = None):
        self.prompts, self.cache_reader = prompts, cache_reader

    def __call__(self, samples):
        batch = collate(samples) if self.cache_reader is None else collate_cached(samples, self.cache_reader)
        batch["texts"] = self.prompts.training_texts(batch["subject"], batch["attribute"])
        return batch


class TowerFeatures:
    """(g, P) of a batch from one frozen visual pass (under the training precision's autocast)."""

    def __init__(self, clip, device: torch.device, precision: str):
        self.clip, self.device, self.precision = clip, device, precision

    def wrap_dataset(self, base):
        """The dataset the loader reads."""
        return base

    def collate(self, prompts) -> TrainCollate:
        return TrainCollate(prompts)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        with prec.autocast(self.precision, self.device), torch.no_grad():
            return self.clip.train_visual(images)  # compiled with --compile

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(batch["image"])

    def commit(self) -> None:
        """Everything computed so far is durable (nothing to do without a cache)."""

    def close(self) -> None:
        """Stop background work."""


class CachedTowerFeatures(TowerFeatures):
    """--cache-image-features: rows whose sample came with cached fp16 (g, P) (read by the DataLoader
    workers) skip the visual pass; it runs only on the others, whose fp16 outputs are queued for storing.
    Every row's g and P are the fp16-rounded values (read, or just rounded), so the loss is
    net(clip, g16.float(), P16.float(), texts) whether a row was cached or not."""

    def __init__(self, clip, device: torch.device, precision: str, cache: FeatureCache):
        super().__init__(clip, device, precision)
        self.cache = cache
        self.reader = CacheReader(cache.folder)

    def wrap_dataset(self, base):
        return CachedRowsDataset(base, self.reader)

    def collate(self, prompts) -> TrainCollate:
        return TrainCollate(prompts, self.reader)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        index, image_rows, cached_rows = batch["index"], batch["image_rows"], batch["cached_rows"]
        b, device = len(index), self.device
        g16 = torch.empty((b,) + tuple(self.cache.meta["g_shape"][1:]), dtype=torch.float16, device=device)
        P16 = torch.empty((b,) + tuple(self.cache.meta["P_shape"][1:]), dtype=torch.float16, device=device)
        if len(cached_rows):
            rows = cached_rows.to(device, non_blocking=True)
            g16[rows] = batch["g"].to(device, non_blocking=True)
            P16[rows] = batch["P"].to(device, non_blocking=True)
        if len(image_rows):
            g, P = self.encode(batch["image"])
            g, P = g.half(), P.half()
            self.cache.write(index[image_rows].numpy(), g, P)
            rows = image_rows.to(device, non_blocking=True)
            g16[rows], P16[rows] = g, P
        return g16.float(), P16.float()

    def commit(self) -> None:
        self.cache.commit()  # every queued row stored and marked filled

    def close(self) -> None:
        self.cache.close()  # what was queued is stored, even when training stopped on an error


def open_feature_cache(cache_dir, clip, preprocess_type: str, names: list[str], info: DistInfo) -> FeatureCache:
    """Rank 0 prepares the cache folder (creating or replacing it), the others wait, then every rank opens it."""
    meta = cache_meta(clip, preprocess_type, clip.image_size, list(names))
    cache_dir = Path(cache_dir)
    folder, error = None, None
    if info.is_main:
        try:
            folder = str(prepare_cache(cache_dir, meta))
        except (OSError, UserError) as e:
            error = f"--feature-cache-dir {cache_dir}: {e}; pass a writable folder or drop --cache-image-features"
    # collective, so it is also the barrier: no rank opens the folder before rank 0 made it, and a
    # failure on rank 0 stops every rank instead of leaving them waiting
    folder, error = all_gather_object((folder, error), info)[0]
    if error:
        raise ConfigError(error)
    cache = FeatureCache(folder, meta)
    log.info(f"feature cache: {folder}: {cache.num_filled()} of {len(names)} images cached")
    return cache
