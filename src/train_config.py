"""What a training run is asked to do, and everything checked before its slow part.

- `TrainConfig`: one field per flag of src/train.py, with the same name and default; the checkpoints'
  `hparams` are its fields plus what the run resolved (`resolved_hparams`).
- `preflight`: every check that can fail before CLIP is loaded, in the order that fails fastest: the
  values (the global batch included), the precision on this device, the validation root, the resume
  path, the output folders (taken and checked by rank 0 under the run's lock, run_folder.py), the
  checkpoint to resume from, and the training pairs with every image they list, compared with the
  pairs the checkpoint was trained on (`data_fingerprint`).
"""
from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import precision as prec
from checkpoint import CheckpointError, is_authors_checkpoint, load_checkpoint
from datasets import DEFAULT_ROOTS, ImageNetPairsDataset
from distributed import DistInfo, all_gather_object, every_rank, main_only
from errors import ConfigError, UserError
from evaluation import check_layout
from logs import get_logger
from models import ABLATIONS
from run_folder import RunLock, check_start, remove_leftovers
from transforms import build_transform
from utils import check_output_folder

# fields that steer the run rather than define the training (the speed options change only float rounding):
# a resume may change them without a warning
RUN_CONTROL_KEYS = {"resume", "epochs", "max_steps", "save_every_steps", "save_frequency", "workers", "device", "cache_hash_images",
                    "allow_changes", "model_dir", "imagenet_path", "val_dataset", "val_data_path", "val_frequency",
                    "val_batch_size", "val_cache_dir", "dist_timeout_minutes", "feature_cache_dir", "no_progress",
                    "compile", "clip_half", "causal_text_attention", "fused_adamw", "deterministic"}

log = get_logger("train_config")


@dataclass
class TrainConfig:
    """A training run (src/train.py's flags, under their names; docs/METHOD.md §6-9 for the method's)."""

    # data
    imagenet_path: str = DEFAULT_ROOTS["imagenet"]
    pairs_path: str | None = None  # None: <imagenet_path>/pairs.json
    preprocess_type: str = "targetpad"
    workers: int = 8
    cache_image_features: bool = False
    cache_hash_images: bool = False
    feature_cache_dir: str | None = None  # None: <imagenet_path>/.fti4cir_cache
    # optimisation
    batch_size: int = 256  # per process
    lr: float = 4e-5
    wd: float = 0.01
    epochs: int = 80  # the authors' code: 80; their README: 60
    lr_decay: int = 10
    lr_div: float = 0.1
    seed: int = 42
    precision: str = "fp16"
    # network
    num_k: int = 24
    topk: int = 12
    epsilon: float = 0.05
    temperature: float = 0.2
    reg_weight: float = 1.4
    tf_layer: int = 3
    tf_head: int = 1
    mapper_dropout: float = 0.5
    ablation: str | None = None  # --no-attributes / --no-subject: models.ABLATIONS (METHOD §14)
    # CLIP (clip_loader.load_clip's arguments)
    clip_model: str = "ViT-L/14"
    clip_weights: str | None = None
    clip_format: str = "auto"
    clip_pretrained: str | None = None
    # checkpoints and logs
    model_dir: str = "./model_save"
    save_frequency: int = 1
    save_every_steps: int = 0
    resume: str | None = None
    allow_changes: bool = False  # with resume: other CLIP weights or other training pairs are logged, not refused
    max_steps: int = 0
    # validation
    val_dataset: str | None = None
    val_data_path: str | None = None
    val_frequency: int = 1
    val_batch_size: int = 32
    val_cache_dir: str = ".cache/features"
    # speed
    compile: bool = False
    clip_half: bool = False
    causal_text_attention: bool = False
    fused_adamw: bool = False
    deterministic: bool = False
    # processes
    device: str | None = None
    no_progress: bool = False
    dist_timeout_minutes: float = 60.0

    def __post_init__(self):
        self.pairs_path = self.pairs_path or str(Path(self.imagenet_path) / "pairs.json")
        self.feature_cache_dir = self.feature_cache_dir or str(Path(self.imagenet_path) / ".fti4cir_cache")

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.model_dir) / "checkpoints"


def check_values(config: TrainConfig) -> None:
    """Every value out of range, in one ConfigError."""
    problems = []
    at_least_one = ("batch_size", "epochs", "val_frequency", "val_batch_size")
    for name in (*at_least_one, "workers", "save_frequency", "save_every_steps", "max_steps"):
        value, least = getattr(config, name), 1 if name in at_least_one else 0
        if value < least:
            problems.append(f"--{name.replace('_', '-')} {value} (must be >= {least})")
    for name in ("lr", "lr_div", "wd", "epsilon", "temperature", "reg_weight", "mapper_dropout", "dist_timeout_minutes"):
        if not math.isfinite(getattr(config, name)):
            problems.append(f"--{name.replace('_', '-')} {getattr(config, name)} must be a finite number")
    if config.lr <= 0 or config.lr_div <= 0:
        problems.append(f"--lr {config.lr} / --lr-div {config.lr_div} must be positive")
    if config.ablation not in (None, *ABLATIONS):
        problems.append(f"ablation {config.ablation!r}: choose one of {tuple(ABLATIONS)} (flags --no-attributes, --no-subject)")
    if not 0 <= config.mapper_dropout < 1:
        problems.append(f"--mapper-dropout {config.mapper_dropout} must be in [0, 1)")
    if problems:
        raise ConfigError("invalid values: " + "; ".join(problems))


def val_root(config: TrainConfig) -> Path | None:
    """The validation benchmark's root folder (None without --val-dataset), which must exist."""
    if not config.val_dataset:
        return None
    root = Path(config.val_data_path or DEFAULT_ROOTS[config.val_dataset])
    if not root.is_dir():
        raise ConfigError(f"--val-dataset {config.val_dataset}: {root} is not a folder; pass --val-data-path")
    # its val split's layout now, as evaluate.py reads it, not after the first epoch
    name = config.val_dataset
    try:
        check_layout(name, root, "val")
    except UserError as e:
        raise ConfigError(f"--val-dataset {name} --val-data-path {root}: {str(e).splitlines()[0]} "
                          f"(`python src/check_data.py --{name}-path {root}` shows the layout it expects)") from None
    return root


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        path = ckpt_dir / "latest.pt"
        if not path.is_file():
            log.info(f"--resume latest: no {path} yet; starting from scratch")
            return None
        return path
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume {resume}: no such file (pass 'latest' or a checkpoint written by train.py)")
    return path


def _epoch_number(path: Path) -> int:
    try:
        return int(path.stem.split("_")[-1])
    except ValueError:
        return -1


def read_resume_state(path: Path, ckpt_dir: Path) -> dict:
    """The training checkpoint to resume from, read and checked before anything slow is loaded; an
    unreadable one is named with the newest epoch checkpoint to fall back to."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        others = [p for p in sorted(ckpt_dir.glob("epoch_*.pt"), key=_epoch_number)
                  if p.is_file() and not p.samefile(path)]
        hint = f"; resume from the newest epoch checkpoint instead: --resume {others[-1]}" if others else ""
        raise CheckpointError(f"--resume: {e}{hint}") from None
    lacking = [k for k in ("optimizer", "epoch", "samples_in_epoch", "global_step") if k not in state]
    if lacking:
        raise CheckpointError(f"--resume {path}: not a training checkpoint (it lacks {', '.join(lacking)}: only the "
                              "network was saved); resume from <model-dir>/checkpoints/latest.pt or epoch_N.pt, or "
                              f"{NETWORK_ONLY_ADVICE.format(path=path)}")
    return state


# what a file holding only the network can be used for: train.py starts from fresh weights and has no flag
# that starts a run from given ones
NETWORK_ONLY_ADVICE = ("evaluate it with evaluate.py / test.py --model-path {path} (a new training run, without "
                       "--resume, starts from fresh weights: train.py has no flag that starts from given ones)")


def refuse_authors_checkpoint(path: Path) -> None:
    """The authors' released file holds the network alone (a pickled module: no optimizer, no position)."""
    if is_authors_checkpoint(path):
        raise CheckpointError(f"--resume {path}: the authors' released file holds only the network (no optimizer "
                              "state, epoch or step), so it cannot be resumed; "
                              + NETWORK_ONLY_ADVICE.format(path=path))


def data_fingerprint(dataset: ImageNetPairsDataset) -> dict:
    """The training data as a checkpoint records it: the pairs file (path, SHA-256 of its bytes, first 16
    digits) and the number of images it lists."""
    h = hashlib.sha256()
    with open(dataset.pairs_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"pairs_file": str(dataset.pairs_path), "pairs_sha256": h.hexdigest()[:16], "images": len(dataset)}


def _describe_data(data: dict) -> str:
    return (f"{data.get('images', '?')} images, pairs file {data.get('pairs_file', '?')} "
            f"(sha256 {data.get('pairs_sha256', '?')})")


def check_resume_data(path: Path, state: dict, data: dict, allow_changes: bool, world_size: int, is_main: bool) -> None:
    """The checkpoint's training pairs against this run's: other pairs are refused, naming both, unless
    `allow_changes` (then one log line); a mid-epoch position past the end of this run's data is refused
    either way. A checkpoint that records neither the data nor the CLIP says so in one line."""
    saved = state.get("data")
    if saved is None or "clip_fingerprint" not in state:
        if is_main:
            missing = [what for key, what in (("clip_fingerprint", "CLIP"), ("data", "data")) if key not in state]
            log.info(f"--resume {path} does not record the {' or the '.join(missing)} it was trained on; not checked")
    if saved is not None and (saved.get("pairs_sha256"), saved.get("images")) != (data["pairs_sha256"], data["images"]):
        if not allow_changes:
            raise ConfigError(f"--resume {path} was trained on other data ({_describe_data(saved)}) than this run's "
                              f"({_describe_data(data)}); pass the --imagenet-path / --pairs-path it was trained on, "
                              "or --allow-changes to go on with this data")
        if is_main:
            log.warning(f"--allow-changes: resuming {path} on other data: {_describe_data(saved)} -> "
                        f"{_describe_data(data)}")
    done, per_process = state["samples_in_epoch"], data["images"] // world_size
    if done // world_size > per_process:
        raise ConfigError(f"--resume {path} stopped {done} samples into epoch {state['epoch'] + 1}, past the end "
                          f"of this run's data ({data['images']} images, {per_process * world_size} samples per epoch over "
                          f"{world_size} process(es)); resume from an epoch checkpoint (epoch_N.pt) instead, or with "
                          "the data it was trained on")


def check_resume_clip(path: Path, state: dict, fingerprint: str, source: str, allow_changes: bool,
                      is_main: bool) -> None:
    """The CLIP a checkpoint was trained over (its weights' fingerprint) against the one loaded: other
    weights are refused, naming both, unless `allow_changes` (then one log line); nothing to compare
    when the checkpoint records none (`check_resume_data` said so)."""
    saved = state.get("clip_fingerprint")
    if saved is None or saved == fingerprint:
        return
    old = f"fingerprint {saved}, {state.get('hparams', {}).get('clip_source', 'source not recorded')}"
    new = f"fingerprint {fingerprint}, {source}"
    if not allow_changes:
        raise ConfigError(f"--resume {path} was trained over other CLIP weights ({old}) than the ones loaded ({new}); "
                          "pass the --clip-weights / --clip-model it was trained with, or --allow-changes to go on "
                          "over these")
    if is_main:
        log.warning(f"--allow-changes: resuming {path} over other CLIP weights: {old} -> {new}")


def claim_folders(config: TrainConfig, info: DistInfo) -> RunLock:
    """Rank 0 takes --model-dir's lock, refuses a folder that holds a run without --resume, checks that
    checkpoints/ and the caches' folders can be written and removes leftovers; every rank learns the result
    (a failure stops them all)."""
    model_dir = Path(config.model_dir)
    lock = RunLock(model_dir)

    def claim():
        check_output_folder(model_dir, "--model-dir")
        lock.acquire()
        try:
            check_start(model_dir, config.resume)
            check_output_folder(config.ckpt_dir, "--model-dir")
            if config.cache_image_features:
                check_output_folder(config.feature_cache_dir, "--feature-cache-dir",
                                    "pass a folder you can write to, or drop --cache-image-features")
            if config.val_dataset and config.val_cache_dir:
                check_output_folder(config.val_cache_dir, "--val-cache-dir", "pass a folder you can write to, or ''")
            remove_leftovers(model_dir)
        except BaseException:
            lock.release()
            raise

    main_only(info, claim, f"claiming --model-dir {model_dir}")  # collective: also the barrier the others wait at
    return lock


# what `training.start` writes in --model-dir before the first checkpoint
START_FILES = ("hyperparameters.json", "train_log.jsonl", "tensorboard")


def run_files_present(model_dir) -> set[str]:
    """The START_FILES already in `model_dir`, so that a failed start removes only what it wrote."""
    return {name for name in START_FILES if (Path(model_dir) / name).exists()}


def forget_failed_start(model_dir, present: set[str]) -> None:
    """After a start that failed before writing any checkpoint (training._train says which failures count):
    removes the START_FILES it wrote (not those in `present`), which would otherwise make the next run on
    the folder ask for --resume, with nothing to resume from."""
    model_dir = Path(model_dir)
    removed = []
    for name in START_FILES:
        path = model_dir / name
        if name in present or not path.exists():
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:  # the failure being raised matters more; say what is left
            log.warning(f"could not remove {path} ({e.strerror or e}): remove it before the next run on {model_dir}")
            continue
        removed.append(name)
    if removed:
        log.info(f"the run stopped before its first checkpoint: removed {', '.join(removed)} from {model_dir}, so "
                 "the next run there starts without --resume")


@dataclass
class Preflight:
    """What `preflight` found, for the run to use: the precision it trains in, the validation root, the
    checkpoint to resume from (path and contents), the training pairs and their fingerprint
    (`data_fingerprint`), and the folder's lock (held)."""

    precision: str
    val_root: Path | None
    resume_path: Path | None
    resume_state: dict | None
    dataset: ImageNetPairsDataset
    data: dict
    lock: RunLock
    made: list[Path]  # the folders this start created (deepest first): removed if the run fails before it starts


def remove_empty_folders(folders: list[Path]) -> None:
    """Removes each of `folders` (deepest first) that is empty: a run that never started leaves none behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone: left as it is
            pass


def preflight(config: TrainConfig, info: DistInfo, device) -> Preflight:
    """Every check of a run before the slow CLIP load, on every process, the fastest first. Holds the
    folder's lock when it returns (`Preflight.lock`), released here when a later check fails. Each part
    ends with a collective that every process reaches, failed or not, so a check that fails on one node
    alone (a folder it does not see) stops every process instead of leaving them waiting."""
    def flags():
        check_values(config)
        if config.batch_size * info.world_size < 2:  # one sample is its own only candidate: the loss is 0
            raise ConfigError(f"--batch-size {config.batch_size} x {info.world_size} process(es) is a global batch of 1; "
                              "the contrastive loss needs at least 2 samples (with one it is 0): raise --batch-size")
        precision = prec.training_precision(config.precision, device)
        if precision != config.precision and info.is_main:
            log.warning(f"--precision {config.precision} needs a CUDA device; training in {precision} on {device}")
        root = val_root(config)
        resume_path = resolve_resume(config.resume, config.ckpt_dir)
        if resume_path is not None:
            refuse_authors_checkpoint(resume_path)
        return precision, root, resume_path

    precision, root, resume_path = every_rank(info, flags, "checking the flags")
    folders = [config.ckpt_dir, Path(config.model_dir)] + [Path(f) for f, used in (
        (config.feature_cache_dir, config.cache_image_features), (config.val_cache_dir, config.val_dataset)) if f and used]
    made = sorted({a for f in folders for a in (f, *f.parents) if not a.exists()}, key=lambda f: -len(f.parts))
    def inputs():
        state = read_resume_state(resume_path, config.ckpt_dir) if resume_path else None
        # every listed image is checked here
        dataset = ImageNetPairsDataset(config.imagenet_path, config.pairs_path, build_transform(config.preprocess_type, 224))
        if len(dataset) // info.world_size // config.batch_size == 0:  # what the run's sampler will find
            raise ConfigError(f"{len(dataset)} training pairs give no full batch of {config.batch_size} x "
                              f"{info.world_size} process(es); lower --batch-size")
        data = data_fingerprint(dataset)
        if state is not None:
            check_resume_data(resume_path, state, data, config.allow_changes, info.world_size, info.is_main)
        return state, dataset, data

    lock = None
    try:
        lock = claim_folders(config, info)
        state, dataset, data = every_rank(info, inputs, "reading the training pairs")
    except BaseException:
        if lock is not None:
            lock.release()
        if info.is_main:
            remove_empty_folders(made)
        raise
    return Preflight(precision, root, resume_path, state, dataset, data, lock, made)


def check_same_start(info: DistInfo, position: tuple[int, int, int], checkpoint) -> None:
    """Every process starts from the same (epoch, samples in it, global step) (collective). A --model-dir
    on node-local disks would let rank 0 resume while a node that sees no checkpoint starts fresh: their
    step counts, and so their collectives, would no longer match, and DDP would not notice their optimizer
    states differ."""
    starts = all_gather_object((tuple(position), str(checkpoint or "no checkpoint")), info)
    if any(s != tuple(position) for s, _ in starts):
        where = "; ".join(f"rank {r}: {path} (epoch {s[0]}, global step {s[2]})" for r, (s, path) in enumerate(starts))
        raise ConfigError(f"the processes start from different points ({where}): give every node the same --model-dir "
                          "(a shared file system) or --resume the same checkpoint file")


def resolved_hparams(config: TrainConfig, net, clip, info: DistInfo, device, precision: str) -> dict:
    """The checkpoints' and hyperparameters.json's record: every field, then what the run resolved."""
    h = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(asdict(config).items())}
    h.update(world_size=info.world_size, global_batch_size=config.batch_size * info.world_size,
             precision_used=precision, device_type=device.type, clip_source=str(clip.source),
             network=net.cfg.to_dict())
    return h


def hparam_differences(old: dict, new: dict) -> list[str]:
    old = {"cache_image_features": False, **old}  # hparams without the key: trained without the feature cache
    keys = (set(old) | set(new)) - RUN_CONTROL_KEYS
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in sorted(keys) if old.get(k) != new.get(k)]
