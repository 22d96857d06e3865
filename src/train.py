"""Pre-training FTI4CIR on ImageNet images with BLIP subject/attribute pairs (SPEC 6-9).

    python src/train.py --save-frequency 1 --batch-size=256 --lr=4e-5 --wd=0.01 --epochs=60 \
        --model-dir="./model_save" --workers=8 --model ViT-L/14
    torchrun --nproc_per_node=8 src/train.py ...        # one node, 8 GPUs (--batch-size is per process)

Outputs under --model-dir: `checkpoints/epoch_<n>.pt` (n = completed epochs, 1-based), `checkpoints/latest.pt`,
`hyperparameters.json`, `train_log.jsonl` (one line per step) and `tensorboard/`.

The step: images -> one frozen-CLIP visual pass under no_grad giving (g, P) -> the network's loss
(`FTI4CIR.forward`) under autocast -> gradient scaler -> AdamW. Only the network is in DDP; CLIP is
passed to it as an argument. With N processes, features are all-gathered with gradient before the
contrastive loss, so N processes with batch B/N each train like one process with batch B.

--cache-image-features (src/train_cache.py) stores each image's (g, P) in fp16 the first time it is computed;
later epochs and runs read them back, decoding no image and skipping the visual pass. The network then sees
g and P rounded to fp16 (the one numeric difference from the uncached path).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from checkpoint import CheckpointError, load_checkpoint, save_network
from cli import FlagParser, add_clip_args, add_device_arg, clip_from_args
from datasets import AnnotationFormatError, DatasetLayoutError, ImageNetPairsDataset, collate
from distributed import (DistInfo, ResumableDistributedSampler, all_gather_object, all_reduce_mean, barrier,
                         cleanup_distributed, gather_with_grad, init_distributed)
from models import FTI4CIR
from train_cache import CacheReader, CachedRowsDataset, FeatureCache, cache_meta, collate_cached, prepare_cache
from transforms import PREPROCESS_TYPES, build_transform
from utils import atomic_write_json, seed_everything

PRECISIONS = ("fp16", "bf16", "fp32")
VAL_DATASETS = ("fashioniq", "cirr", "circo")
LOSS_KEYS = ("total", "contrastive", "ortho", "reg", "num_attributes")
# flags that steer the run rather than define the training: a resume may change them without a warning
RUN_CONTROL_KEYS = {"resume", "epochs", "max_steps", "save_every_steps", "save_frequency", "workers", "device",
                    "model_dir", "imagenet_path", "val_dataset", "val_data_path", "val_frequency",
                    "val_batch_size", "val_cache_dir", "dist_timeout_minutes", "feature_cache_dir"}


def build_parser() -> FlagParser:
    p = FlagParser(prog="train.py", description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--imagenet-path", "--ImageNetPath", dest="imagenet_path", default="./data/ImageNet",
                   help="ImageNet root holding test/ILSVRC2012_test_XXXXXXXX.JPEG")
    d.add_argument("--pairs-path", "--imgCaptionPath", dest="pairs_path", default=None,
                   help="caption pairs JSON [{img_id, subject, attribute}, ...] (SPEC 8); default <imagenet-path>/pairs.json")
    d.add_argument("--preprocess-type", default="targetpad", choices=PREPROCESS_TYPES,
                   help="image preprocessing: targetpad (ratio 1.25, SPEC 9) or CLIP's own")
    d.add_argument("--workers", "--num-workers", dest="workers", type=int, default=8, help="DataLoader worker processes per training process")
    d.add_argument("--cache-image-features", action="store_true",
                   help="store each training image's frozen-CLIP outputs (g and P, fp16, memory-mapped) the first time "
                        "they are computed; later epochs/runs read them instead of decoding the image and running the "
                        "visual tower. Disk: (D + (N+1) x W) x 2 bytes per image, about 0.5 MB for ViT-L/14, about 52 GB "
                        "for the 100k ImageNet test images. The one numeric change: g and P are rounded to fp16")
    d.add_argument("--feature-cache-dir", default=None,
                   help="where --cache-image-features keeps its files, one subfolder per (CLIP weights, preprocessing, "
                        "image list) key (default <imagenet-path>/.fti4cir_cache)")

    o = p.add_argument_group("optimisation (SPEC 7)")
    o.add_argument("--batch-size", type=int, default=256,
                   help="batch size PER PROCESS; the contrastive loss sees batch-size x number of processes")
    o.add_argument("--lr", type=float, default=4e-5, help="AdamW learning rate")
    o.add_argument("--wd", type=float, default=0.01, help="AdamW weight decay")
    o.add_argument("--epochs", "--num-epochs", dest="epochs", type=int, default=80, help="number of epochs (the authors' code: 80; their README: 60)")
    o.add_argument("--lr-decay", type=int, default=10,
                   help="0-based epoch index at whose start the learning rate is multiplied by --lr-div (once)")
    o.add_argument("--lr-div", type=float, default=0.1, help="learning-rate factor applied from epoch --lr-decay on")
    o.add_argument("--seed", type=int, default=42, help="seed of the network's initialisation and the data order; "
                   "process r draws its dropout masks from seed + r")
    o.add_argument("--precision", default="fp16", choices=PRECISIONS,
                   help="fp16: autocast + gradient scaler (the authors'; on a CPU device it falls back to fp32); "
                        "bf16: autocast, no scaler; fp32: no autocast")

    m = p.add_argument_group("network (SPEC 2-6)")
    m.add_argument("--num-k", type=int, default=24, help="K, number of attribute templates")
    m.add_argument("--topk", type=int, default=12, help="most attribute pseudo-words per image")
    m.add_argument("--epsilon", type=float, default=0.05, help="attribute score threshold")
    m.add_argument("--temperature", type=float, default=0.2, help="tau of the contrastive loss")
    m.add_argument("--reg-weight", "--hy_regLoss", dest="reg_weight", type=float, default=1.4,
                   help="lambda, weight of the regularisation loss")
    m.add_argument("--tf-layer", type=int, default=3, help="layers of the local-attribute transformer")
    m.add_argument("--tf-head", type=int, default=1, help="attention heads of the local-attribute transformer")
    m.add_argument("--mapper-dropout", type=float, default=0.5, help="dropout inside the pseudo-word mappers")
    add_clip_args(p)

    s = p.add_argument_group("checkpoints and logs")
    s.add_argument("--model-dir", default="./model_save",
                   help="output folder: checkpoints/, hyperparameters.json, train_log.jsonl, tensorboard/")
    s.add_argument("--save-frequency", type=int, default=1,
                   help="write checkpoints/epoch_<n>.pt when n %% save-frequency == 0 (n = completed epochs; 0: never). "
                        "checkpoints/latest.pt is written after every epoch")
    s.add_argument("--save-every-steps", type=int, default=0,
                   help="also write checkpoints/latest.pt every N optimisation steps (mid-epoch resume points; 0: off)")
    s.add_argument("--resume", default=None,
                   help="'latest' (<model-dir>/checkpoints/latest.pt; starts fresh when there is none) or a checkpoint path")
    s.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimisation steps in total, having written latest.pt (0: no limit; "
                        "for tests and time-limited jobs: resume with --resume latest)")

    v = p.add_argument_group("validation (rank 0, with evaluate.py's code)")
    v.add_argument("--val-dataset", default=None, choices=VAL_DATASETS, help="benchmark to validate on")
    v.add_argument("--val-data-path", default=None,
                   help="its root folder (default ./data/FashionIQ, ./data/CIRR or ./data/CIRCO)")
    v.add_argument("--val-frequency", "--validation-frequency", dest="val_frequency", type=int, default=1, help="validate every N epochs")
    v.add_argument("--val-batch-size", type=int, default=32, help="validation batch size")
    v.add_argument("--val-cache-dir", default=".cache/features",
                   help="gallery-feature cache shared with evaluate.py ('' : none)")

    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch summary lines stay)")
    p.add_argument("--dist-timeout-minutes", type=float, default=60.0,
                   help="process-group timeout (the other ranks wait this long while rank 0 validates)")
    return p


def check_args(args) -> None:
    problems = []
    for name in ("batch_size", "epochs", "workers", "save_frequency", "save_every_steps", "max_steps", "val_frequency"):
        value = getattr(args, name)
        if value < (1 if name in ("batch_size", "val_frequency") else 0):
            problems.append(f"--{name.replace('_', '-')} {value}")
    if args.lr <= 0 or args.lr_div <= 0:
        problems.append(f"--lr {args.lr} / --lr-div {args.lr_div} must be positive")
    if not 0 <= args.mapper_dropout < 1:
        problems.append(f"--mapper-dropout {args.mapper_dropout} must be in [0, 1)")
    if problems:
        raise SystemExit("error: invalid values: " + "; ".join(problems))


def learning_rate(epoch: int, lr: float, lr_decay: int, lr_div: float) -> float:
    """SPEC 7: lr for 0-based epoch `epoch`; multiplied by lr_div once, from epoch index lr_decay on."""
    return lr * lr_div if epoch >= lr_decay else lr


def resolve_precision(precision: str, device: torch.device, log=print) -> str:
    if precision == "fp16" and device.type != "cuda":
        log(f"notice: --precision fp16 needs a CUDA device; training in fp32 on {device}")
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


class TrainCollate:
    """Stacks images and builds the regularisation loss's token ids in the DataLoader workers."""

    def __init__(self, prompts, cache_reader: CacheReader | None = None):
        self.prompts, self.cache_reader = prompts, cache_reader

    def __call__(self, samples):
        batch = collate(samples) if self.cache_reader is None else collate_cached(samples, self.cache_reader)
        batch["texts"] = self.prompts.training_texts(batch["subject"], batch["attribute"])
        return batch


def encode_images(clip, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, P) of a batch from ONE frozen visual pass (cached_batch_losses stores and reuses them)."""
    with torch.no_grad():
        return clip.encode_image_tokens(images)


def batch_losses(model, clip, batch: dict, device: torch.device, precision: str, gather) -> dict:
    """The loss terms of one batch: one frozen visual pass, then the network, both under autocast."""
    images = batch["image"].to(device, non_blocking=True)
    texts = {k: v.to(device, non_blocking=True) for k, v in batch["texts"].items()}
    with autocast(precision, device):
        g, P = encode_images(clip, images)
        return model(clip, g, P, texts, gather)


def cached_batch_losses(model, clip, batch: dict, device: torch.device, precision: str, gather,
                        cache: FeatureCache) -> dict:
    """batch_losses with --cache-image-features: rows whose sample came with cached fp16 `g`/`P` (read by
    the DataLoader workers) skip the visual pass; the visual pass runs only on the others, whose fp16
    outputs are queued for storing. Every row's g and P are the fp16-rounded values (read or just
    rounded), so the loss is net(clip, g16.float(), P16.float(), texts) whether a row was cached or not."""
    index, image_rows, cached_rows = batch["index"], batch["image_rows"], batch["cached_rows"]
    b = len(index)
    texts = {k: v.to(device, non_blocking=True) for k, v in batch["texts"].items()}
    g16 = torch.empty((b,) + tuple(cache.meta["g_shape"][1:]), dtype=torch.float16, device=device)
    P16 = torch.empty((b,) + tuple(cache.meta["P_shape"][1:]), dtype=torch.float16, device=device)
    if len(cached_rows):
        rows = cached_rows.to(device, non_blocking=True)
        g16[rows] = batch["g"].to(device, non_blocking=True)
        P16[rows] = batch["P"].to(device, non_blocking=True)
    if len(image_rows):
        images = batch["image"].to(device, non_blocking=True)
        with autocast(precision, device):
            g, P = encode_images(clip, images)
        g, P = g.half(), P.half()
        cache.write(index[image_rows].numpy(), g, P)
        rows = image_rows.to(device, non_blocking=True)
        g16[rows], P16[rows] = g, P
    with autocast(precision, device):
        return model(clip, g16.float(), P16.float(), texts, gather)


def open_feature_cache(args, clip, dataset, info: DistInfo, log) -> FeatureCache:
    """Rank 0 prepares the cache folder (creating or replacing it), the others wait, then every rank opens it."""
    meta = cache_meta(clip, args.preprocess_type, clip.image_size, list(dataset.names))
    cache_dir = Path(args.feature_cache_dir)
    folder, error = None, None
    if info.is_main:
        try:
            folder = str(prepare_cache(cache_dir, meta))
        except (OSError, SystemExit) as e:
            error = (f"error: --feature-cache-dir {cache_dir}: {e}; pass a writable folder "
                     "or drop --cache-image-features")
    # collective, so it is also the barrier: no rank opens the folder before rank 0 made it, and a
    # failure on rank 0 stops every rank instead of leaving them waiting
    folder, error = all_gather_object((folder, error), info)[0]
    if error:
        raise SystemExit(error)
    cache = FeatureCache(folder, meta)
    log(f"feature cache: {folder}: {cache.num_filled()} of {len(dataset)} images cached")
    return cache


# ---------------------------------------------------------------------------------------------
# RNG states (plain lists/tensors only, so checkpoints load with weights_only=True)

def capture_rng(device: torch.device) -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------

def _jsonable(value):
    return str(value) if isinstance(value, Path) else value


def resolved_hparams(args, net, clip, info: DistInfo, device, precision: str) -> dict:
    h = {k: _jsonable(v) for k, v in sorted(vars(args).items())}
    h.update(world_size=info.world_size, global_batch_size=args.batch_size * info.world_size,
             precision_used=precision, device_type=device.type, clip_source=str(clip.source),
             network=net.cfg.to_dict())
    return h


def hparam_differences(old: dict, new: dict) -> list[str]:
    old = {"cache_image_features": False, **old}  # checkpoints from before the flag existed trained without it
    keys = (set(old) | set(new)) - RUN_CONTROL_KEYS
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in sorted(keys) if old.get(k) != new.get(k)]


def resolve_resume(resume: str | None, ckpt_dir: Path, log) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        path = ckpt_dir / "latest.pt"
        if not path.is_file():
            log(f"--resume latest: no {path} yet; starting from scratch")
            return None
        return path
    path = Path(resume)
    if not path.is_file():
        raise SystemExit(f"error: --resume {resume}: no such file (pass 'latest' or a checkpoint written by train.py)")
    return path


def build_dataset(args, image_size: int = 224) -> ImageNetPairsDataset:
    """The training pairs; every listed image's file is checked here, before CLIP is loaded."""
    try:
        return ImageNetPairsDataset(args.imagenet_path, args.pairs_path, build_transform(args.preprocess_type, image_size))
    except (DatasetLayoutError, AnnotationFormatError) as e:
        raise SystemExit(f"error: {e}") from e


VAL_ROOTS = {"fashioniq": "./data/FashionIQ", "cirr": "./data/CIRR", "circo": "./data/CIRCO"}


def val_root(args) -> Path | None:
    if not args.val_dataset:
        return None
    root = Path(args.val_data_path or VAL_ROOTS[args.val_dataset])
    if not root.is_dir():
        raise SystemExit(f"error: --val-dataset {args.val_dataset}: {root} is not a folder; pass --val-data-path")
    return root


def run_validation(args, clip, net, device) -> dict:
    """evaluate.py's validation metrics (percent) of the current network on --val-dataset's val split.

    fp32 inference as the authors; the gallery features (frozen CLIP) are cached by evaluate.py's
    code in --val-cache-dir, so only the first validation encodes the gallery.
    """
    from evaluate import USER_ERRORS, evaluate

    try:
        return evaluate(net, clip, args.val_dataset, val_root(args), split="val", preprocess_type=args.preprocess_type,
                        batch_size=args.val_batch_size, workers=args.workers, device=device, precision="fp32",
                        cache_dir=args.val_cache_dir or None, progress=False)
    except USER_ERRORS + (ValueError,) as e:
        raise SystemExit(f"error: validation on {args.val_dataset}: {e}") from e


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same file as src, atomically (hard link, else a copy), without a second torch.save."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class _Writers:
    """Rank 0's TensorBoard writer and JSON-lines step log; no-ops elsewhere."""

    def __init__(self, model_dir: Path, enabled: bool, purge_step: int | None):
        self.tb = self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(model_dir / "tensorboard"), purge_step=purge_step)
            self.jsonl = open(model_dir / "train_log.jsonl", "a", encoding="utf-8")

    def step(self, record: dict, global_step: int) -> None:
        if self.tb is None:
            return
        for k, v in record.items():
            if k not in ("epoch", "step", "global_step"):
                self.tb.add_scalar(("perf/" if k in ("images_per_s", "data_wait_s", "step_s") else "train/") + k, v, global_step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def scalars(self, prefix: str, values: dict, global_step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, global_step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.jsonl.close()


def main(argv=None) -> dict:
    """Trains; returns {"global_step", "epochs_done", "last_checkpoint", "stopped_early"} (on every rank)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    args.pairs_path = args.pairs_path or str(Path(args.imagenet_path) / "pairs.json")
    args.feature_cache_dir = args.feature_cache_dir or str(Path(args.imagenet_path) / ".fti4cir_cache")
    info, device = init_distributed(args.device, args.dist_timeout_minutes)
    ok = False
    try:
        result = _train(args, info, device)
        ok = True
        return result
    finally:
        cleanup_distributed(info, ok)


def _train(args, info: DistInfo, device: torch.device) -> dict:
    log = print if info.is_main else (lambda *a, **k: None)
    model_dir = Path(args.model_dir)
    ckpt_dir = model_dir / "checkpoints"
    precision = resolve_precision(args.precision, device, log)
    world, b = info.world_size, args.batch_size

    resume_path = resolve_resume(args.resume, ckpt_dir, log)  # input errors first, before any slow loading
    val_root(args)
    dataset = build_dataset(args)  # fails fast on missing images, before the (slow) CLIP load
    clip = clip_from_args(args, device)
    dataset.preprocess = build_transform(args.preprocess_type, clip.image_size)
    seed_everything(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = FTI4CIR.for_clip(clip, num_k=args.num_k, topk=args.topk, epsilon=args.epsilon, temperature=args.temperature,
                           reg_weight=args.reg_weight, tf_layer=args.tf_layer, tf_head=args.tf_head,
                           mapper_dropout=args.mapper_dropout).to(device)
    cache = open_feature_cache(args, clip, dataset, info, log) if args.cache_image_features else None
    sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=info.rank, seed=args.seed)
    steps_per_epoch = sampler.num_samples // b
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} training pairs give no full batch of {b} x {world} processes; "
                         "lower --batch-size")
    reader = None if cache is None else CacheReader(cache.folder)
    loader = DataLoader(dataset if cache is None else CachedRowsDataset(dataset, reader),
                        batch_size=b, sampler=sampler, num_workers=args.workers, drop_last=True,
                        collate_fn=TrainCollate(net.prompts(clip), reader),
                        pin_memory=device.type == "cuda",
                        # its own generator: creating an epoch's iterator must not draw from the global RNG,
                        # or a resumed run's dropout masks would differ from an uninterrupted run's
                        generator=torch.Generator().manual_seed(args.seed + info.rank),
                        persistent_workers=args.workers > 0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    hparams = resolved_hparams(args, net, clip, info, device, precision)

    start_epoch, start_samples, global_step, last_ckpt, rng_state = 0, 0, 0, None, None
    if resume_path is not None:
        try:
            state = load_checkpoint(resume_path)
        except CheckpointError as e:
            raise SystemExit(f"error: --resume: {e}") from e
        diffs = hparam_differences(state.get("hparams", {}), hparams)
        if diffs and info.is_main:
            warnings.warn(f"resuming {resume_path} with different hyper-parameters (the current flags apply): "
                          + "; ".join(diffs), stacklevel=2)
        try:
            net.load_state_dict(state["state_dict"])
        except RuntimeError as e:
            raise SystemExit(f"error: --resume {resume_path}: its network does not fit the current flags "
                             f"(saved config {state['config']}): {str(e)[:300]}") from e
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # load_state_dict brings the saved wd back; the flags apply
            group["weight_decay"] = args.wd
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_samples, global_step = state["epoch"], state["samples_in_epoch"], state["global_step"]
        rngs = state.get("rng") or []
        if len(rngs) == world:
            rng_state = rngs[info.rank]
        else:
            log(f"notice: {resume_path} was written by {len(rngs)} processes, this run has {world}: "
                "random streams are re-seeded, dropout masks will differ from an uninterrupted run")
        if start_samples % world:
            log(f"notice: {start_samples} samples done in the epoch do not split over {world} processes; "
                "a few samples of that epoch are repeated")
        last_ckpt = resume_path
        log(f"resumed {resume_path}: epoch {start_epoch + 1}, {start_samples} samples into it, global step {global_step}")

    seed_everything(args.seed + info.rank)  # per-rank streams (dropout masks differ between ranks)
    if rng_state is not None:
        restore_rng(rng_state, device)
    model = net
    if info.enabled:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    gather = gather_with_grad if info.enabled else None

    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(hparams, model_dir / "hyperparameters.json")
    writers = _Writers(model_dir, info.is_main, purge_step=global_step if resume_path is not None else None)

    def save(path: Path, epoch: int, samples: int, step: int) -> Path:
        if cache is not None:
            cache.commit()  # every queued row stored and marked filled before the checkpoint that skips it
        rng = all_gather_object(capture_rng(device), info)  # every rank's streams (collective: all ranks call it)
        if info.is_main:
            save_network(net, path, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                         samples_in_epoch=samples, step=step, global_step=global_step, world_size=world,
                         rng=rng, hparams=hparams)
        return path

    if start_epoch >= args.epochs:
        log(f"nothing to train: {resume_path} already holds {start_epoch} epochs and --epochs is {args.epochs}")
    else:
        log(f"training {len(dataset)} pairs, {steps_per_epoch} steps/epoch of {b} x {world} process(es), "
            f"epochs {start_epoch + 1}..{args.epochs}, {precision} on {device}; outputs in {model_dir}")
    stopped_early, epochs_done, bar = False, start_epoch, None
    try:
        net.train()
        for epoch in range(start_epoch, args.epochs):
            lr = learning_rate(epoch, args.lr, args.lr_decay, args.lr_div)
            for group in optimizer.param_groups:
                group["lr"] = lr
            samples_done = start_samples if epoch == start_epoch else 0
            skip = samples_done // world  # per-rank indices already trained on this epoch
            sampler.set_epoch(epoch, skip)
            step = skip // b
            last_step = step + len(loader)  # < steps_per_epoch only after a resume across a batch-size change
            sums = np.zeros(len(LOSS_KEYS))
            ran, epoch_t0, wait_total = 0, time.perf_counter(), 0.0
            bar = _progress(steps_per_epoch, step, f"epoch {epoch + 1}/{args.epochs}", info.is_main and not args.no_progress)
            t_last = time.perf_counter()
            for batch in loader:
                t_batch = time.perf_counter()
                if cache is None:
                    out = batch_losses(model, clip, batch, device, precision, gather)
                else:
                    out = cached_batch_losses(model, clip, batch, device, precision, gather, cache)
                stats = all_reduce_mean(torch.stack([out[k].detach().float() for k in LOSS_KEYS]), info).tolist()
                if not all(math.isfinite(x) for x in stats):
                    if cache is not None:
                        cache.commit()  # non-finite visual features would be the cause: that error first
                    raise SystemExit(
                        f"error: non-finite loss at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1}): "
                        + ", ".join(f"{k} {v}" for k, v in zip(LOSS_KEYS, stats))
                        + ". Stopped before that update; no weights were written. Last good checkpoint: "
                        + (f"{last_ckpt} (resume with --resume {last_ckpt})" if last_ckpt else "none yet"))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out["total"]).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                global_step += 1
                samples_done += b * world
                now = time.perf_counter()
                wait = t_batch - t_last
                sums += stats
                ran += 1
                wait_total += wait
                record = {"epoch": epoch + 1, "step": step, "global_step": global_step, "lr": lr,
                          **{("loss" if k == "total" else k if k == "num_attributes" else f"loss_{k}"): v
                             for k, v in zip(LOSS_KEYS, stats)},
                          "images_per_s": b * world / max(now - t_last, 1e-9), "data_wait_s": wait, "step_s": now - t_batch}
                writers.step(record, global_step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums[0] / ran:.4f}", lr=f"{lr:.2g}")
                mid_epoch = step < last_step
                limit = args.max_steps and global_step >= args.max_steps
                if mid_epoch and ((args.save_every_steps and global_step % args.save_every_steps == 0) or limit):
                    last_ckpt = save(ckpt_dir / "latest.pt", epoch, samples_done, step)
                if mid_epoch and limit:
                    stopped_early = True
                    break
                t_last = time.perf_counter()
            if bar is not None:
                bar.close()
                bar = None
            if stopped_early:
                break

            epochs_done = done = epoch + 1  # checkpoint names count completed epochs: epoch_1.pt after the first epoch
            if args.save_frequency and done % args.save_frequency == 0:
                last_ckpt = save(ckpt_dir / f"epoch_{done}.pt", done, 0, 0)
                if info.is_main:
                    _link_or_copy(last_ckpt, ckpt_dir / "latest.pt")
            else:
                last_ckpt = save(ckpt_dir / "latest.pt", done, 0, 0)
            means = dict(zip(LOSS_KEYS, sums / max(ran, 1)))
            secs = time.perf_counter() - epoch_t0
            log(f"epoch {done}/{args.epochs}: loss {means['total']:.4f} (contrastive {means['contrastive']:.4f}, "
                f"ortho {means['ortho']:.4f}, reg {means['reg']:.4f}), {means['num_attributes']:.1f} attributes/image, "
                f"lr {lr:.3g}, {ran * b * world / max(secs, 1e-9):.1f} images/s, data wait {wait_total:.1f} s, "
                f"{secs:.0f} s; saved {last_ckpt}")
            writers.scalars("epoch", {f"loss_{k}": v for k, v in means.items()}, global_step)
            if args.val_dataset and done % args.val_frequency == 0:
                if info.is_main:
                    metrics = run_validation(args, clip, net, device)
                    log(f"validation {args.val_dataset} after epoch {done}: "
                        + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
                    writers.scalars(f"val_{args.val_dataset}", metrics, global_step)
                barrier(info)
            if args.max_steps and global_step >= args.max_steps:
                stopped_early = done < args.epochs
                break
    finally:
        if bar is not None:  # an exception mid-epoch: close the bar now, not at interpreter exit
            bar.close()
        writers.close()
        if cache is not None:
            cache.close()  # what was queued is stored, even when training stopped on an error
    if stopped_early:
        log(f"stopped at global step {global_step} (--max-steps {args.max_steps}); resume with --resume latest")
    return {"global_step": global_step, "epochs_done": epochs_done,
            "last_checkpoint": str(last_ckpt) if last_ckpt else None, "stopped_early": stopped_early}


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # in a log file (no terminal) refresh rarely: each refresh is a line there
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


if __name__ == "__main__":
    main()
