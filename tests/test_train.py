"""src/train.py on CPU with a tiny random CLIP and generated images: end to end, the learning-rate step,
overfitting, mid-epoch resume, non-finite losses, DDP (2 gloo processes) against one process."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

import models
import train
import training
from checkpoint import load_checkpoint, load_network
from datasets import ImageNetPairsDataset
from helpers import checkpoint_weights, ddp_train_worker, free_port, make_pairs_data, read_log, train_args
from utils import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tiny models run on one thread


# ---------------------------------------------------------------------------------------------
# flags

README_COMMAND = ["--save-frequency", "1", "--batch-size=256", "--lr=4e-5", "--wd=0.01", "--epochs=60",
                  "--model-dir=./model_save", "--workers=8", "--model", "ViT-L/14"]


def test_readme_command_parses_with_the_authors_defaults():
    args = train.build_parser().parse_args(README_COMMAND)
    assert (args.save_frequency, args.batch_size, args.lr, args.wd, args.epochs, args.model_dir, args.workers,
            args.clip_model) == (1, 256, 4e-5, 0.01, 60, "./model_save", 8, "ViT-L/14")
    d = train.build_parser().parse_args([])
    # METHOD §6-7 defaults
    assert (d.num_k, d.topk, d.epsilon, d.temperature, d.reg_weight, d.tf_layer, d.tf_head) == (24, 12, 0.05, 0.2, 1.4, 3, 1)
    assert (d.lr_decay, d.lr_div, d.seed, d.epochs, d.preprocess_type, d.precision) == (10, 0.1, 42, 80, "targetpad", "fp16")
    assert d.imagenet_path == "./data/ImageNet" and d.mapper_dropout == 0.5


def test_authors_spellings_are_aliases():
    a = train.build_parser().parse_args(["--imgCaptionPath", "p.json", "--hy_regLoss", "2.5", "--batch_size", "8",
                                         "--clip_model_name", "ViT-B/32"])
    assert (a.pairs_path, a.reg_weight, a.batch_size, a.clip_model) == ("p.json", 2.5, 8, "ViT-B/32")
    # the spellings of the authors' train.py parser (their README's command uses open_clip-style ones)
    a = train.build_parser().parse_args(["--ImageNetPath", "/x", "--num_epochs", "7", "--num_workers", "3",
                                         "--model_dir", "m", "--validation_frequency", "2", "--lr_decay", "5"])
    assert (a.imagenet_path, a.epochs, a.workers, a.model_dir, a.val_frequency, a.lr_decay) == ("/x", 7, 3, "m", 2, 5)


def test_learning_rate_schedule():
    lrs = [training.learning_rate(e, 4e-5, 10, 0.1) for e in range(12)]
    assert lrs[:10] == [4e-5] * 10 and all(math.isclose(x, 4e-6) for x in lrs[10:])


def test_bad_values_and_missing_images_are_named(tmp_path, tiny_clip_path):
    with pytest.raises(SystemExit, match="--batch-size 0"):
        train.main(train_args(tmp_path, tiny_clip_path, tmp_path / "m", "--batch-size", 0))
    data = make_pairs_data(tmp_path / "imagenet", n=3)
    (data / "test" / "ILSVRC2012_test_00000002.JPEG").unlink()
    with pytest.raises(SystemExit, match="00000002"):
        train.main(train_args(data, tiny_clip_path, tmp_path / "m"))
    with pytest.raises(SystemExit, match="no-such.json"):
        train.main(train_args(data, tiny_clip_path, tmp_path / "m", "--pairs-path", tmp_path / "no-such.json"))


# ---------------------------------------------------------------------------------------------
# one end-to-end run: 2 epochs of 2 steps, checkpoint every 2 epochs, lr step at epoch index 1

@pytest.fixture(scope="module")
def e2e_run(data8, tiny_clip_path, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("e2e") / "model_save"
    result = train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 2,
                                  "--save-frequency", 2, "--lr", 1e-3, "--lr-decay", 1, "--lr-div", 0.25))
    return model_dir, result


def test_end_to_end_outputs(e2e_run, tiny_clip):
    model_dir, result = e2e_run
    ckpts = model_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_2.pt", "latest.pt"]  # 2 % 2 == 0, 1 % 2 != 0
    assert result == {"global_step": 4, "epochs_done": 2, "last_checkpoint": str(ckpts / "epoch_2.pt"), "stopped_early": False,
                      "stopped_by": None}
    h = json.loads((model_dir / "hyperparameters.json").read_text())
    assert (h["lr"], h["batch_size"], h["world_size"], h["precision_used"]) == (1e-3, 4, 1, "fp32")
    assert h["pairs_path"].endswith("pairs.json") and h["network"]["num_k"] == 24

    state = load_checkpoint(ckpts / "latest.pt")
    assert (state["epoch"], state["step"], state["global_step"]) == (2, 0, 4)
    assert {"optimizer", "scaler", "rng", "hparams"} <= set(state)
    assert all(torch.equal(v, checkpoint_weights(ckpts / "epoch_2.pt")[k]) for k, v in state["state_dict"].items())
    net, info = load_network(ckpts / "epoch_2.pt")  # what evaluate.py reads
    assert info["epoch"] == 2
    seed_everything(42)
    init = models.FTI4CIR.for_clip(tiny_clip).state_dict()  # train.py's initialisation
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    assert max((net.state_dict()[k] - v).abs().max().item() for k, v in init.items()) > 1e-4  # it trained

    log = read_log(model_dir)
    assert [r["global_step"] for r in log] == [1, 2, 3, 4] and [r["epoch"] for r in log] == [1, 1, 2, 2]
    assert all(math.isfinite(r[k]) for r in log for k in ("loss", "loss_contrastive", "loss_ortho", "loss_reg"))
    for r in log:  # the total is the sum of METHOD §6's terms
        assert r["loss"] == pytest.approx(r["loss_contrastive"] + r["loss_ortho"] + 1.4 * r["loss_reg"], rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(model_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_contrastive", "train/loss_ortho", "train/loss_reg", "train/lr",
            "perf/images_per_s", "perf/data_wait_s"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_learning_rate_steps_at_lr_decay(e2e_run):
    model_dir, _ = e2e_run
    log = read_log(model_dir)
    assert [r["lr"] for r in log] == pytest.approx([1e-3, 1e-3, 2.5e-4, 2.5e-4])  # epoch index 1 starts at 1e-3 x 0.25
    groups = load_checkpoint(model_dir / "checkpoints" / "latest.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([2.5e-4])


def test_bf16_autocast_on_cpu(data8, tiny_clip_path, tmp_path):
    model_dir = tmp_path / "run"
    train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 1, "--precision", "bf16"))
    assert json.loads((model_dir / "hyperparameters.json").read_text())["precision_used"] == "bf16"
    assert len(read_log(model_dir)) == 2 and all(math.isfinite(r["loss"]) for r in read_log(model_dir))
    net, _ = load_network(model_dir / "checkpoints" / "epoch_1.pt")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in net.state_dict().values())


def test_loss_falls_when_overfitting_one_batch(tmp_path, tiny_clip_path):
    data = make_pairs_data(tmp_path / "imagenet", n=4, seed=3)
    model_dir = tmp_path / "run"
    train.main(train_args(data, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 10, "--save-frequency", 0,
                         "--lr", 5e-3, "--mapper-dropout", 0))
    losses = [r["loss"] for r in read_log(model_dir)]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# resume

def test_resume_mid_epoch_equals_uninterrupted_run(data8, tiny_clip_path, tmp_path, monkeypatch):
    common = ["--batch-size", 2, "--epochs", 2, "--lr", 1e-3]  # 4 steps per epoch; dropout on (0.5)
    straight = tmp_path / "straight"
    train.main(train_args(data8, tiny_clip_path, straight, *common))

    cut = tmp_path / "cut"
    first = train.main(train_args(data8, tiny_clip_path, cut, *common, "--max-steps", 6))  # "killed" at step 6 of 8
    assert first["stopped_early"] and first["global_step"] == 6
    latest = load_checkpoint(cut / "checkpoints" / "latest.pt")
    assert (latest["epoch"], latest["step"], latest["samples_in_epoch"]) == (1, 2, 4)

    loads = []  # images loaded by the resumed run: only the rest of epoch 2 (skipped at the sampler level)
    original = ImageNetPairsDataset.__getitem__
    monkeypatch.setattr(ImageNetPairsDataset, "__getitem__", lambda self, i: loads.append(i) or original(self, i))
    second = train.main(train_args(data8, tiny_clip_path, cut, *common, "--resume", "latest"))
    assert second["global_step"] == 8 and len(loads) == 4

    want = checkpoint_weights(straight / "checkpoints" / "epoch_2.pt")
    got = checkpoint_weights(cut / "checkpoints" / "epoch_2.pt")
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ from the uninterrupted run's"
    opt_a = load_checkpoint(straight / "checkpoints" / "epoch_2.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(cut / "checkpoints" / "epoch_2.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # the resumed run's log continues the step count; its losses equal the straight run's
    log_a, log_b = read_log(straight), read_log(cut)
    assert [r["global_step"] for r in log_b] == list(range(1, 9))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_resume_with_other_hyperparameters_warns(e2e_run, data8, tiny_clip_path, tmp_path, capsys):
    model_dir, _ = e2e_run
    ckpt = model_dir / "checkpoints" / "epoch_2.pt"
    result = train.main(train_args(data8, tiny_clip_path, tmp_path / "again", "--batch-size", 4, "--epochs", 2,
                                   "--lr", 2e-3, "--lr-decay", 1, "--lr-div", 0.25, "--resume", ckpt))
    assert re.search(r"warning: resuming .* with different hyper-parameters.*lr: 0\.001 -> 0\.002", capsys.readouterr().out)
    assert result["global_step"] == 4  # nothing left to train: epochs already done
    with pytest.raises(SystemExit, match="no such file"):
        train.main(train_args(data8, tiny_clip_path, tmp_path / "again", "--resume", tmp_path / "missing.pt"))


def test_non_finite_loss_stops_and_names_the_last_checkpoint(data8, tiny_clip_path, tmp_path, monkeypatch):
    calls = []
    original = models.contrastive_loss

    def poisoned(u, w, t):  # NaN from the 3rd training step on
        calls.append(1)
        loss = original(u, w, t)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(models, "contrastive_loss", poisoned)
    model_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 2, "--epochs", 1, "--save-every-steps", 2))
    msg = str(exc.value)
    assert "global step 3" in msg and str(model_dir / "checkpoints" / "latest.pt") in msg
    state = load_checkpoint(model_dir / "checkpoints" / "latest.pt")
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (model_dir / "checkpoints" / "epoch_1.pt").exists()


# ---------------------------------------------------------------------------------------------
# DDP: 2 gloo processes with batch 2 each == 1 process with batch 4

def test_ddp_two_processes_equal_one_process(data8, tiny_clip, tiny_clip_path, tmp_path):
    import torch.multiprocessing as mp

    # lr 1e-5: Adam moves every weight by about lr per step whatever its gradient's size, so where a
    # gradient entry is near zero, float rounding (batch 2+2 vs 4 sums) can flip its step: weights can
    # differ by a fraction of lr x steps. The gradients themselves are compared below, through Adam's moments
    lr = 1e-5
    common = ["--epochs", 2, "--lr", lr, "--mapper-dropout", 0, "--save-frequency", 2]
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    argv = train_args(data8, tiny_clip_path, ddp_dir, "--batch-size", 2, *common)
    mp.spawn(ddp_train_worker, args=(2, free_port(), argv), nprocs=2, join=True)
    train.main(train_args(data8, tiny_clip_path, single_dir, "--batch-size", 4, *common))

    h = json.loads((ddp_dir / "hyperparameters.json").read_text())
    assert (h["world_size"], h["global_batch_size"]) == (2, 4)
    log_ddp, log_one = read_log(ddp_dir), read_log(single_dir)
    assert len(log_ddp) == len(log_one) == 4
    for key in ("loss", "loss_contrastive", "loss_ortho", "loss_reg"):
        assert [r[key] for r in log_ddp] == pytest.approx([r[key] for r in log_one], abs=1e-5), key

    a = load_checkpoint(ddp_dir / "checkpoints" / "epoch_2.pt")
    b = load_checkpoint(single_dir / "checkpoints" / "epoch_2.pt")
    steps = len(log_one)
    for k, v in b["state_dict"].items():
        # all but a few weights agree to 1e-6; a weight whose gradient sits at rounding level may have
        # had one of its Adam steps flipped (up to 2 lr each), which CPUs with other kernels do differently
        d = (a["state_dict"][k] - v).abs()
        assert float(d.max()) <= 2 * lr * steps and int((d > 1e-6).sum()) <= max(1, d.numel() // 1000), \
            (k, float(d.max()), int((d > 1e-6).sum()))
    seed_everything(42)
    init = models.FTI4CIR.for_clip(tiny_clip, mapper_dropout=0.0).state_dict()
    assert max((a["state_dict"][k] - v).abs().max().item() for k, v in init.items()) > 2e-5  # moved more than the tolerance
    # Adam is invariant to the gradient's scale, so equal weights alone would not catch a gradient
    # N times too large or small; Adam's first moment is linear in the gradients and does
    for i, s in b["optimizer"]["state"].items():
        m_ddp, m_one = a["optimizer"]["state"][i]["exp_avg"], s["exp_avg"]
        assert torch.allclose(m_ddp, m_one, atol=1e-7 + 1e-3 * m_one.abs().max().item(), rtol=1e-3), i


def test_validation_runs_evaluate_and_logs_metrics(tiny_clip_path, tmp_path, capsys):
    from toy.world import make_toy_world
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toy = make_toy_world(tmp_path / "toy", seed=0, num_train_images=4, num_queries=2, num_distractors=2)
    model_dir = tmp_path / "run"
    train.main(train_args(toy / "ImageNet", tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 1,
                         "--val-dataset", "cirr", "--val-data-path", toy / "CIRR", "--val-cache-dir", ""))
    assert "validation cirr after epoch 1: cirr_recall_at1" in capsys.readouterr().out
    acc = EventAccumulator(str(model_dir / "tensorboard"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("val_cirr/cirr_recall_at1")]
    assert len(values) == 1 and 0 <= values[0] <= 100
    with pytest.raises(SystemExit, match="--val-data-path"):
        train.main(train_args(toy / "ImageNet", tiny_clip_path, model_dir, "--val-dataset", "circo",
                             "--val-data-path", tmp_path / "nowhere"))
