"""Pre-training FTI4CIR on ImageNet images with BLIP subject/attribute pairs (METHOD §6-9).

    python src/train.py --save-frequency 1 --batch-size=256 --lr=4e-5 --wd=0.01 --epochs=60 \
        --model-dir="./model_save" --workers=8 --model ViT-L/14
    torchrun --nproc_per_node=8 src/train.py ...        # one node, 8 GPUs (--batch-size is per process)

Outputs under --model-dir: `checkpoints/epoch_<n>.pt` (n = completed epochs, 1-based), `checkpoints/latest.pt`,
`hyperparameters.json`, `train_log.jsonl` (one line per step) and `tensorboard/`.

The flags become a `train_config.TrainConfig` (one field per flag, same names and defaults); the run
itself is `training.train` (the checks before the slow part, set-up, restoring a checkpoint, epochs,
the end-of-epoch step).

--cache-image-features (src/feature_store.py) stores each image's (g, P) in fp16 the first time it is computed;
later epochs and runs read them back, decoding no image and skipping the visual pass. The network then sees
g and P rounded to fp16 (the one numeric difference from the uncached path).
"""
from __future__ import annotations

import signal
from dataclasses import fields

from cli import FlagParser, add_authors_train_args, add_clip_args, add_device_arg, authors_train_notices, script_main
from datasets import BENCHMARKS
from distributed import cleanup_distributed, init_distributed
from logs import get_logger, setup_logging
from precision import TRAIN_PRECISIONS
from train_config import TrainConfig
from training import train, use_deterministic_algorithms
from transforms import PREPROCESS_TYPES

log = get_logger("train")
D = TrainConfig()  # the defaults


def build_parser() -> FlagParser:
    p = FlagParser(prog="train.py", description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--imagenet-path", "--ImageNetPath", dest="imagenet_path", default=D.imagenet_path,
                   help="ImageNet root holding test/ILSVRC2012_test_XXXXXXXX.JPEG")
    d.add_argument("--pairs-path", "--imgCaptionPath", dest="pairs_path", default=None,
                   help="caption pairs JSON [{img_id, subject, attribute}, ...] (docs/METHOD.md §8); default <imagenet-path>/pairs.json")
    d.add_argument("--preprocess-type", default=D.preprocess_type, choices=PREPROCESS_TYPES,
                   help="image preprocessing: targetpad (ratio 1.25, docs/METHOD.md §9) or CLIP's own")
    d.add_argument("--workers", "--num-workers", dest="workers", type=int, default=D.workers, help="DataLoader worker processes per training process")
    d.add_argument("--cache-image-features", action="store_true",
                   help="store each training image's frozen-CLIP outputs (g and P, fp16, memory-mapped) the first time "
                        "they are computed; later epochs/runs read them instead of decoding the image and running the "
                        "visual tower. Disk: (D + (N+1) x W) x 2 bytes per image, about 0.5 MB for ViT-L/14, about 52 GB "
                        "for the 100k ImageNet test images. The one numeric change: g and P are rounded to fp16")
    d.add_argument("--cache-hash-images", action="store_true",
                   help="key the training feature cache and the validation gallery cache on the images' contents (each "
                        "file read and hashed) instead of their sizes and modification times")
    d.add_argument("--feature-cache-dir", default=None,
                   help="where --cache-image-features keeps its files, one subfolder per (CLIP weights, preprocessing, "
                        "image list) key (default <imagenet-path>/.fti4cir_cache)")

    o = p.add_argument_group("optimisation (docs/METHOD.md §7)")
    o.add_argument("--batch-size", type=int, default=D.batch_size,
                   help="batch size PER PROCESS; the contrastive loss sees batch-size x number of processes")
    o.add_argument("--lr", type=float, default=D.lr, help="AdamW learning rate")
    o.add_argument("--wd", type=float, default=D.wd, help="AdamW weight decay")
    o.add_argument("--epochs", "--num-epochs", dest="epochs", type=int, default=D.epochs, help="number of epochs (the authors' code: 80; their README: 60)")
    o.add_argument("--lr-decay", type=int, default=D.lr_decay,
                   help="0-based epoch index at whose start the learning rate is multiplied by --lr-div (once)")
    o.add_argument("--lr-div", type=float, default=D.lr_div, help="learning-rate factor applied from epoch --lr-decay on")
    o.add_argument("--seed", type=int, default=D.seed, help="seed of the network's initialisation and the data order; "
                   "process r draws its dropout masks from seed + r")
    o.add_argument("--precision", default=D.precision, choices=TRAIN_PRECISIONS,
                   help="fp16: autocast + gradient scaler (the authors'; on a CPU device it falls back to fp32); "
                        "bf16: autocast, no scaler; fp32: no autocast")

    m = p.add_argument_group("network (docs/METHOD.md §2-6)")
    m.add_argument("--num-k", type=int, default=D.num_k, help="K, number of attribute templates")
    m.add_argument("--topk", type=int, default=D.topk, help="most attribute pseudo-words per image")
    m.add_argument("--epsilon", type=float, default=D.epsilon, help="attribute score threshold")
    m.add_argument("--temperature", type=float, default=D.temperature, help="tau of the contrastive loss")
    m.add_argument("--reg-weight", "--hy_regLoss", dest="reg_weight", type=float, default=D.reg_weight,
                   help="lambda, weight of the regularisation loss")
    m.add_argument("--tf-layer", type=int, default=D.tf_layer, help="layers of the local-attribute transformer")
    m.add_argument("--tf-head", type=int, default=D.tf_head, help="attention heads of the local-attribute transformer")
    m.add_argument("--mapper-dropout", type=float, default=D.mapper_dropout, help="dropout inside the pseudo-word mappers")
    ablation = m.add_mutually_exclusive_group()  # the two together would leave no pseudo-word to train
    ablation.add_argument("--no-attributes", dest="ablation", action="store_const", const="no-attributes", default=None,
                          help="the paper's ablation: train and compose with the subject pseudo-word alone, a one-token "
                               "inversion (METHOD §14); recorded in the checkpoint")
    ablation.add_argument("--no-subject", dest="ablation", action="store_const", const="no-subject",
                          help="the paper's ablation: train and compose with the attribute pseudo-words alone "
                               "(METHOD §14); recorded in the checkpoint")
    add_clip_args(p)

    s = p.add_argument_group("checkpoints and logs")
    s.add_argument("--model-dir", default=D.model_dir,
                   help="output folder: checkpoints/, hyperparameters.json, train_log.jsonl, tensorboard/")
    s.add_argument("--save-frequency", type=int, default=D.save_frequency,
                   help="write checkpoints/epoch_<n>.pt when n %% save-frequency == 0 (n = completed epochs; 0: never). "
                        "checkpoints/latest.pt is written after every epoch")
    s.add_argument("--save-every-steps", type=int, default=D.save_every_steps,
                   help="also write checkpoints/latest.pt every N optimisation steps (mid-epoch resume points; 0: off)")
    s.add_argument("--resume", default=None,
                   help="'latest' (<model-dir>/checkpoints/latest.pt; starts fresh when there is none) or a checkpoint path")
    s.add_argument("--allow-changes", action="store_true",
                   help="with --resume: go on when the CLIP weights or the training pairs differ from those the "
                        "checkpoint records (each difference is one log line); without it, either is refused")
    s.add_argument("--max-steps", type=int, default=D.max_steps,
                   help="stop after this many optimisation steps in total, having written latest.pt (0: no limit; "
                        "for tests and time-limited jobs: resume with --resume latest)")

    v = p.add_argument_group("validation (rank 0, with evaluate.py's code)")
    v.add_argument("--val-dataset", default=None, choices=BENCHMARKS, help="benchmark to validate on")
    v.add_argument("--val-data-path", default=None,
                   help="its root folder (default ./data/FashionIQ, ./data/CIRR or ./data/CIRCO)")
    v.add_argument("--val-frequency", "--validation-frequency", dest="val_frequency", type=int, default=D.val_frequency, help="validate every N epochs")
    v.add_argument("--val-batch-size", type=int, default=D.val_batch_size, help="validation batch size")
    v.add_argument("--val-cache-dir", default=D.val_cache_dir,
                   help="gallery-feature cache shared with evaluate.py ('' : none)")

    f = p.add_argument_group("speed (docs/PERFORMANCE.md; each is off by default because it changes the numbers "
                             "by float rounding)")
    f.add_argument("--compile", action="store_true",
                   help="torch.compile the frozen visual tower's training pass (the first steps take longer)")
    f.add_argument("--clip-half", action="store_true",
                   help="hold the frozen visual tower's weights in the --precision type (fp16/bf16) instead of float32")
    f.add_argument("--causal-text-attention", action="store_true",
                   help="text attention through scaled_dot_product_attention(is_causal=True), which lets PyTorch use a "
                        "fused flash kernel, instead of a float mask")
    f.add_argument("--fused-adamw", action="store_true", help="AdamW as one fused kernel")
    f.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels, so two GPU runs give the same weights bit for bit (slower); on "
                        "a CPU runs are deterministic without it")

    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch summary lines stay)")
    p.add_argument("--dist-timeout-minutes", type=float, default=D.dist_timeout_minutes,
                   help="process-group timeout (the other ranks wait this long while rank 0 validates)")
    add_authors_train_args(p)
    return p


def config_from_args(args) -> TrainConfig:
    """The TrainConfig the parsed flags describe (every flag is a field of the same name)."""
    missing = {f.name for f in fields(TrainConfig)} - set(vars(args))
    if missing:  # a field that no flag sets would silently keep its default
        raise TypeError(f"TrainConfig fields without a flag: {sorted(missing)}")
    return TrainConfig(**vars(args))


@script_main
def main(argv=None) -> dict:
    """Trains; returns {"global_step", "epochs_done", "last_checkpoint", "stopped_early", "stopped_by"} (on
    every rank). Stopped by SIGTERM or SIGINT, it exits with status 128 + the signal's number instead."""
    args = build_parser().parse_args(argv)
    notices = authors_train_notices(args)
    config = config_from_args(args)
    if config.deterministic:
        use_deterministic_algorithms()  # before any GPU work: cuBLAS reads its workspace setting when it starts
    info, device = init_distributed(config.device, config.dist_timeout_minutes)
    setup_logging(info.is_main)
    for line in notices:
        log.info(line)
    ok = False
    try:
        result = train(config, info, device)
        ok = True
    finally:
        cleanup_distributed(info, ok)
    if result["stopped_by"]:
        log.info(f"stopped by {result['stopped_by']} at global step {result['global_step']}; "
                 f"{result['last_checkpoint']} is written: resume with --resume latest")
        number = getattr(signal.Signals, result["stopped_by"], signal.SIGTERM)
        raise SystemExit(128 + int(number))
    return result


if __name__ == "__main__":
    main()
