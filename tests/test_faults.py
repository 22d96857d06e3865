"""Nothing lost under faults: one training run per folder (lock, takeover, refusal), a clean stop on
SIGTERM / SIGINT that resumes bitwise, output folders checked before CLIP loads, leftovers removed, bad
inputs and misleading messages turned into one line that names the file and the fix."""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cli
import train
import training
from checkpoint import load_checkpoint, load_network, save_network
from datasets import AnnotationFormatError, CIRRDataset, ImageNetPairsDataset
from helpers import checkpoint_weights, free_port, make_pairs_data, read_log, small_circo, train_args
from models import FTI4CIR, attribute_slots
from prompts import PromptBuilder
from run_folder import LOCK_NAME, RunLock
from transforms import build_transform

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tiny models run on one thread


def _exit_message(fn, *args) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# one training run per --model-dir

def test_a_second_run_on_a_busy_folder_stops_at_once_naming_the_owner(data8, tiny_clip_path, tmp_path, monkeypatch):
    model_dir = tmp_path / "run"
    lock = RunLock(model_dir)
    lock.acquire()  # another run holds the folder
    loaded = []
    monkeypatch.setattr(training, "load_clip", lambda *a, **k: loaded.append(1))
    try:
        msg = _exit_message(train.main, train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4))
    finally:
        lock.release()
    assert str(model_dir) in msg and "in use by another training run" in msg and f"pid {os.getpid()}" in msg
    assert "host " in msg and "started " in msg and not loaded  # stopped before CLIP was loaded
    assert not (model_dir / "hyperparameters.json").exists() and not (model_dir / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(data8, tiny_clip_path, tmp_path, capsys):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / LOCK_NAME).write_text(json.dumps({"host": "gone-host", "pid": 999999, "started": "yesterday"}))
    train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 1, "--no-progress"))
    out = capsys.readouterr().out
    assert "took over the lock" in out and "gone-host" in out and "999999" in out
    assert (model_dir / "checkpoints" / "epoch_1.pt").is_file() and not (model_dir / LOCK_NAME).exists()


def test_a_folder_holding_a_run_needs_resume(data8, tiny_clip_path, tmp_path):
    model_dir = tmp_path / "run"
    args = train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 1)
    train.main(args)
    before = (model_dir / "checkpoints" / "epoch_1.pt").stat().st_mtime_ns
    msg = _exit_message(train.main, args)
    assert str(model_dir) in msg and "--resume latest" in msg and "another --model-dir" in msg
    assert (model_dir / "checkpoints" / "epoch_1.pt").stat().st_mtime_ns == before  # nothing overwritten
    assert len(read_log(model_dir)) == 2  # no second run's steps in the log
    train.main(args + ["--resume", "latest", "--epochs", "2"])  # with --resume it goes on
    assert len(read_log(model_dir)) == 4


# ---------------------------------------------------------------------------------------------
# a clean stop on SIGTERM / SIGINT

def _signal_after(monkeypatch, step: int, sig=signal.SIGTERM) -> None:
    """Sends `sig` to this process while the `step`-th training step (1-based, counting every call) runs."""
    calls = []
    original = training.training_step

    def stepping(run, batch):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), sig)  # arrives in the middle of the step: the step must still finish
        return original(run, batch)

    monkeypatch.setattr(training, "training_step", stepping)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_then_resume_equals_an_uninterrupted_run(sig, data8, tiny_clip_path, tmp_path, monkeypatch, capsys):
    common = ["--batch-size", 2, "--epochs", 2, "--lr", 1e-3, "--no-progress"]  # 4 steps per epoch, dropout on
    straight = tmp_path / "straight"
    train.main(train_args(data8, tiny_clip_path, straight, *common))

    cut = tmp_path / "cut"
    before = signal.getsignal(sig)  # the default, or SIG_IGN where the shell started this in the background
    with monkeypatch.context() as mp:
        _signal_after(mp, 6, sig)
        with pytest.raises(SystemExit) as e:
            train.main(train_args(data8, tiny_clip_path, cut, *common))
    assert e.value.code == 128 + int(sig)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"stopped by {sig.name} at global step 6" in last and "--resume latest" in last
    latest = load_checkpoint(cut / "checkpoints" / "latest.pt")
    assert (latest["global_step"], latest["epoch"], latest["step"]) == (6, 1, 2)  # the step in progress finished
    assert signal.getsignal(sig) == before  # handlers given back

    train.main(train_args(data8, tiny_clip_path, cut, *common, "--resume", "latest"))
    want = checkpoint_weights(straight / "checkpoints" / "epoch_2.pt")
    got = checkpoint_weights(cut / "checkpoints" / "epoch_2.pt")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(cut)]


def test_a_signal_on_the_last_step_of_an_epoch_stops_after_the_epoch_checkpoint(data8, tiny_clip_path, tmp_path,
                                                                                 monkeypatch):
    model_dir = tmp_path / "run"
    _signal_after(monkeypatch, 4)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 2, "--epochs", 3, "--no-progress"))
    assert e.value.code == 128 + signal.SIGTERM
    assert (model_dir / "checkpoints" / "epoch_1.pt").is_file()
    assert load_checkpoint(model_dir / "checkpoints" / "latest.pt")["global_step"] == 4
    assert not (model_dir / "checkpoints" / "epoch_2.pt").exists()


def test_a_signal_during_validation_ends_it_and_says_how_to_get_its_metrics(tiny_clip_path, tmp_path, monkeypatch,
                                                                              capsys):
    from toy.world import make_toy_world
    import features

    toy = make_toy_world(tmp_path / "toy", seed=0, num_train_images=4, num_queries=2, num_distractors=2)
    model_dir = tmp_path / "run"
    args = train_args(toy / "ImageNet", tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 2, "--no-progress",
                      "--val-dataset", "cirr", "--val-data-path", toy / "CIRR", "--val-cache-dir", "",
                      "--val-batch-size", 2, "--workers", 1)
    asked, original = [], features.Encoding.check_stop

    def check_stop(self):
        asked.append(1)
        if len(asked) == 2:  # the signal arrives after the validation's first batch
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    with monkeypatch.context() as mp:
        mp.setattr(features.Encoding, "check_stop", check_stop)
        with pytest.raises(SystemExit) as e:
            train.main(args)
    assert e.value.code == 128 + signal.SIGTERM and len(asked) == 2  # no batch encoded after the signal
    out = capsys.readouterr().out
    assert "SIGTERM received: ending the validation (latest.pt is already written)" in out
    assert "validation cirr after epoch 1 ended by SIGTERM, no metrics logged" in out
    assert (f"--dataset cirr --cirr-path {toy / 'CIRR'} --model-path {model_dir / 'checkpoints' / 'epoch_1.pt'} "
            f"--preprocess-type targetpad --clip-model ViT-L/14 --clip-format auto --clip-weights {tiny_clip_path}`") in out
    assert "cirr_recall_at1" not in out
    assert load_checkpoint(model_dir / "checkpoints" / "latest.pt")["epoch"] == 1

    train.main(args + ["--resume", "latest"])  # the next validation runs whole
    assert "validation cirr after epoch 2: cirr_recall_at1" in capsys.readouterr().out


def test_a_run_resumed_after_a_validation_equals_an_uninterrupted_one(tiny_clip_path, tmp_path):
    from toy.world import make_toy_world

    toy = make_toy_world(tmp_path / "toy", seed=0, num_train_images=4, num_queries=2, num_distractors=2)

    def args(model_dir, epochs):
        return train_args(toy / "ImageNet", tiny_clip_path, model_dir, "--batch-size", 2, "--epochs", epochs,
                          "--lr", 1e-3, "--no-progress", "--val-dataset", "cirr", "--val-data-path", toy / "CIRR",
                          "--val-cache-dir", "", "--workers", 1)

    train.main(args(tmp_path / "straight", 2))
    train.main(args(tmp_path / "cut", 1))
    train.main(args(tmp_path / "cut", 2) + ["--resume", "latest"])  # from the checkpoint written before validating
    want = checkpoint_weights(tmp_path / "straight" / "checkpoints" / "epoch_2.pt")
    got = checkpoint_weights(tmp_path / "cut" / "checkpoints" / "epoch_2.pt")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in read_log(tmp_path / "straight")] == [r["loss"] for r in read_log(tmp_path / "cut")]


def test_evaluation_workers_leave_stop_signals_to_the_main_process():
    import features
    from stop_signals import ignore_stop_signals

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"i": i}

    loader = features.make_loader(Rows(), features.Encoding(batch_size=2, workers=2), torch.device("cpu"))
    assert loader.num_workers == 2 and loader.worker_init_fn is ignore_stop_signals


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO / "src")!r})
        from stop_signals import StopOnSignal
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("first:", stop.requested.name, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
            print("still running")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert "first: SIGTERM" in proc.stdout and "still running" not in proc.stdout


def _ddp_stop_worker(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    calls, original = [], training.training_step

    def stepping(run, batch):
        calls.append(1)
        if rank == 1 and len(calls) == 3:  # only rank 1 is told to stop
            os.kill(os.getpid(), signal.SIGTERM)
        return original(run, batch)

    training.training_step = stepping
    code = 0
    try:
        train.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        code = 1
    Path(out, f"rank{rank}.json").write_text(json.dumps({"code": code, "steps": len(calls)}))
    os._exit(0)


def test_ddp_every_rank_stops_at_the_same_step(data8, tiny_clip_path, tmp_path):
    import torch.multiprocessing as mp

    model_dir = tmp_path / "ddp"
    argv = train_args(data8, tiny_clip_path, model_dir, "--batch-size", 1, "--epochs", 1, "--no-progress")
    mp.spawn(_ddp_stop_worker, args=(2, free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [128 + signal.SIGTERM] * 2 and [r["steps"] for r in ranks] == [3, 3]
    assert load_checkpoint(model_dir / "checkpoints" / "latest.pt")["global_step"] == 3


def _ddp_fault_worker(rank: int, world: int, port: int, argv: list[str], out: str, fault: str) -> None:
    """One rank of a gloo run in which rank 1 alone meets `fault`; writes its exit message to rank<r>.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1 and fault == "cache":  # its disk fills while it stores rows
        import feature_store

        def no_space(*a, **k):
            raise OSError(28, "No space left on device")
        feature_store.RowFiles.write_rows = no_space
    elif rank == 1 and fault == "clip":  # its node lacks the weights
        def missing(*a, **k):
            raise cli.UserError("--clip-weights /node1/ViT-L-14.pt: no such file")
        training.load_clip = missing
    elif rank == 1 and fault == "start":  # its node sees no checkpoint: it would start fresh
        import train_config
        train_config.resolve_resume = lambda *a: None
    message = "ok"
    try:
        train.main(argv)
    except SystemExit as e:
        message = str(e.code)
    except BaseException as e:  # noqa: BLE001
        message = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(message))
    os._exit(0)


@pytest.mark.parametrize("fault", ["cache", "clip", "start"])
def test_a_failure_on_one_rank_stops_every_rank(fault, data8, tiny_clip_path, tmp_path):
    """Rank 1 alone fails (a full disk under its feature cache, CLIP weights its node lacks, no checkpoint on
    its node): both ranks exit with one line, rank 0 naming the other's failure, well within the process
    group's timeout (30 s here), instead of waiting for it."""
    import torch.multiprocessing as mp

    model_dir = tmp_path / "ddp"
    argv = train_args(data8, tiny_clip_path, model_dir, "--batch-size", 1, "--epochs", 2, "--no-progress",
                      "--dist-timeout-minutes", 0.5, "--feature-cache-dir", tmp_path / "cache")
    if fault == "cache":
        argv.append("--cache-image-features")
    if fault == "start":
        train.main(argv + ["--epochs", "1", "--batch-size", "2"])
        argv += ["--resume", "latest"]
    mp.spawn(_ddp_fault_worker, args=(2, free_port(), argv, str(tmp_path), fault), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0.startswith("error: ") and rank1.startswith("error: ") and "\n" not in rank0 + rank1, (rank0, rank1)
    assert "Timeout" not in rank0 + rank1 and "timed out" not in rank0 + rank1
    if fault == "cache":
        assert "No space left on device" in rank1 and re.search(r"(another process|rank 1) failed", rank0), rank0
    elif fault == "clip":
        assert "/node1/ViT-L-14.pt" in rank1 and "rank 1 failed while loading CLIP" in rank0
    else:  # both refuse, naming each rank's starting point
        for msg in (rank0, rank1):
            assert "start from different points" in msg and "rank 1: no checkpoint (epoch 0, global step 0)" in msg
            assert "checkpoints/latest.pt (epoch 1, global step 4)" in msg and "--model-dir" in msg


# ---------------------------------------------------------------------------------------------
# start-up checks, leftovers

def test_evaluate_finds_a_missing_model_or_a_wrong_root_before_clip_loads(tmp_path, monkeypatch):
    import evaluate

    loaded = []
    monkeypatch.setattr(evaluate, "load_clip", lambda *a, **k: loaded.append(1))
    empty = tmp_path / "CIRR"
    empty.mkdir()
    base = ["--dataset", "cirr", "--cirr-path", str(empty), "--device", "cpu", "--save-path", str(tmp_path / "out")]
    assert "--model-path is required" in _exit_message(evaluate.main, base)
    msg = _exit_message(evaluate.main, base + ["--model-path", str(tmp_path / "nope.pt")])
    assert f"--model-path {tmp_path / 'nope.pt'}: no such file" in msg
    assert "CIRR val image folder not found" in _exit_message(evaluate.main, base + ["--baseline", "image-only"])
    assert not loaded


def test_unwritable_outputs_are_refused_before_clip_loads(data8, tiny_clip_path, tmp_path, monkeypatch):
    loaded = []
    import evaluate

    for module in (training, evaluate):
        monkeypatch.setattr(module, "load_clip", lambda *a, **k: loaded.append(1))
    blocker = tmp_path / "a_file"  # a file where a folder should be: not creatable, also for root
    blocker.write_text("x")
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, blocker / "run"))
    assert f"--model-dir {blocker / 'run'}" in msg and "cannot create or write" in msg
    model_dir = tmp_path / "run"
    (model_dir).mkdir()
    (model_dir / "checkpoints").write_text("not a folder")
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, model_dir))
    assert "checkpoints" in msg and "cannot create or write" in msg
    import evaluate

    cirr = tmp_path / "CIRR"
    cirr.mkdir()
    for extra, flag in ((["--save-path", str(blocker / "out")], "--save-path"),
                        (["--save-path", str(tmp_path / "out"), "--cache-dir", str(blocker / "c")], "--cache-dir")):
        msg = _exit_message(evaluate.main, ["--dataset", "cirr", "--cirr-path", str(cirr), "--baseline", "image-only",
                                            "--device", "cpu", *extra])
        assert flag in msg and str(blocker) in msg
    import caption

    (tmp_path / "imagenet" / "test").mkdir(parents=True)
    msg = _exit_message(caption.main, ["--imagenet-path", str(tmp_path / "imagenet"), "--out", str(blocker / "p.json"),
                                       "--caption-only"])
    assert "--out" in msg and str(blocker) in msg
    assert not loaded


def test_leftover_temporary_files_are_removed_when_a_run_starts(data8, tiny_clip_path, tmp_path, capsys):
    model_dir = tmp_path / "run"
    (model_dir / "checkpoints").mkdir(parents=True)
    stale = [model_dir / "checkpoints" / ".latest.pt.1234.abcd1234.tmp", model_dir / ".hyperparameters.json.99.x.tmp",
             model_dir / "checkpoints" / ".latest.pt.77.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = model_dir / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 1, "--no-progress"))
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed 3 temporary file(s)" in capsys.readouterr().out


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    from utils import atomic_torch_save

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Boom()}, tmp_path / "latest.pt")
    assert list(tmp_path.iterdir()) == []


def test_the_summary_of_a_resumed_epoch_says_what_it_covers(data8, tiny_clip_path, tmp_path, capsys):
    model_dir = tmp_path / "run"
    common = ["--batch-size", 2, "--epochs", 1, "--no-progress"]
    train.main(train_args(data8, tiny_clip_path, model_dir, *common, "--max-steps", 3))
    capsys.readouterr()
    train.main(train_args(data8, tiny_clip_path, model_dir, *common, "--resume", "latest"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/1"))
    assert "resumed: steps 4-4 of 4" in line


# ---------------------------------------------------------------------------------------------
# a non-finite loss

def test_non_finite_loss_lists_the_checkpoints_with_their_losses(data8, tiny_clip_path, tmp_path):
    model_dir = tmp_path / "run"
    common = ["--batch-size", 2, "--no-progress"]
    train.main(train_args(data8, tiny_clip_path, model_dir, *common, "--epochs", 1))
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, model_dir, *common, "--epochs", 2,
                                              "--resume", "latest", "--lr", "1e30"))
    saved = load_checkpoint(model_dir / "checkpoints" / "epoch_1.pt")
    assert "non-finite loss at epoch 2" in msg and "lower --lr (now 1e+30)" in msg
    assert f"{model_dir / 'checkpoints' / 'epoch_1.pt'} (global step 4, loss {saved['loss']:.4g})" in msg
    assert 0 < saved["loss"] < 100


# ---------------------------------------------------------------------------------------------
# inputs that must not be accepted silently

@pytest.mark.parametrize("pairs, needle", [
    ([{"img_id": "00000001", "subject": None, "attribute": "on grass"}], "'subject' = None, not a non-empty string"),
    ([{"img_id": "00000001", "subject": "a dog", "attribute": " "}], "'attribute' = ' ', not a non-empty string"),
    ([{"img_id": "00000001", "subject": "a dog", "attribute": "x"}, {"img_id": "00000001", "subject": "b", "attribute": "y"}],
     "entries 0 and 1 have the same img_id"),
    ([], "the pairs list is empty"),
])
def test_bad_pairs_files_name_the_file_and_the_entry(pairs, needle, tmp_path):
    root = make_pairs_data(tmp_path / "in", n=2)
    (root / "pairs.json").write_text(json.dumps(pairs))
    with pytest.raises(AnnotationFormatError, match="pairs.json") as e:
        ImageNetPairsDataset(root, root / "pairs.json", build_transform("clip", 32))
    assert needle in str(e.value)


def _cirr(tmp_path: Path, entries: list[dict]) -> Path:
    root = tmp_path / "CIRR"
    (root / "dev").mkdir(parents=True)
    (root / "cirr" / "image_splits").mkdir(parents=True)
    (root / "cirr" / "captions").mkdir(parents=True)
    names = [f"dev-{i}-0-img0" for i in range(8)]
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text(json.dumps({n: f"./dev/{n}.png" for n in names}))
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(entries))
    return root


def _entry(pairid: int, **over) -> dict:
    e = {"pairid": pairid, "reference": "dev-0-0-img0", "target_hard": "dev-1-0-img0", "caption": "is red",
         "img_set": {"id": 1, "members": [f"dev-{i}-0-img0" for i in range(6)]}}
    e.update(over)
    return e


@pytest.mark.parametrize("entries, needle", [
    ([_entry(1, img_set={"id": 1})], "entry 0 lacks ['img_set.members']"),
    ([_entry(1), _entry(1)], "entries 0 and 1 have the same pairid 1"),
    ([_entry(1, caption=None)], "'caption' = None, not a string"),
    ([_entry(1, img_set={"members": "dev-0-0-img0"})], "'img_set.members'"),
])
def test_bad_cirr_annotations_name_the_file_and_the_entry(entries, needle, tmp_path):
    root = _cirr(tmp_path, entries)
    with pytest.raises(AnnotationFormatError, match="cap.rc2.val.json") as e:
        CIRRDataset(root, "val", "query", build_transform("clip", 32))
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------
# messages

def test_truncated_checkpoint_says_copy_it_again_and_names_the_fallback(data8, tiny_clip_path, tmp_path):
    model_dir = tmp_path / "run"
    args = train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 2, "--no-progress")
    train.main(args)
    latest = model_dir / "checkpoints" / "latest.pt"
    latest.unlink()  # a hard link to epoch_2.pt: replace it by a truncated copy
    latest.write_bytes((model_dir / "checkpoints" / "epoch_2.pt").read_bytes()[:5000])
    msg = _exit_message(train.main, args + ["--epochs", "3", "--resume", "latest"])
    assert "truncated or corrupt: copy it again" in msg and "miniz" not in msg
    assert f"--resume {model_dir / 'checkpoints' / 'epoch_2.pt'}" in msg


def test_a_refused_pickle_says_what_and_why_without_torchs_advice(tmp_path):
    from checkpoint import CheckpointError

    path = tmp_path / "evil.pt"
    torch.save({"format": "fti4cir", "payload": print}, path)
    with pytest.raises(CheckpointError) as e:
        load_network(path)
    msg = str(e.value)
    assert "refused" in msg and "print" in msg and "not loaded" in msg
    assert "weights_only" not in msg and "trust" not in msg
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"x": print}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not loaded") as e:
        load_network(legacy)
    assert "weights_only" not in str(e.value)


@pytest.mark.parametrize("content, needle", [(b'{"a": 1}', "not a PyTorch checkpoint"),
                                             (b"garbage", "not a PyTorch checkpoint"),
                                             (b"", "an empty file")])
def test_a_file_that_is_no_checkpoint_is_called_so(content, needle, tmp_path):
    from checkpoint import CheckpointError

    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_network(path)
    assert needle in str(e.value) and "run code" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("argv, needle", [(["--dataset", "cirr", "--precision", "fp8"], "argument --precision: invalid choice"),
                                          (["--dataset", "cirr", "--batch-size", "two"], "argument --batch-size: invalid int"),
                                          (["--dataset", "cirr", "--no-such-flag"], "unrecognized arguments: --no-such-flag")])
def test_a_flag_argparse_cannot_parse_is_one_error_line(argv, needle, capsys):
    import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    msg = str(e.value)
    assert msg.startswith(f"error: {needle}") and msg.endswith("(see evaluate.py --help)") and "\n" not in msg
    assert "usage:" not in capsys.readouterr().err


def test_a_read_error_at_the_boundary_gives_no_disk_advice(capsys):
    @cli.script_main
    def main(argv=None):
        open("/nonexistent-folder/x.json")

    with pytest.raises(SystemExit) as e:
        main([])
    msg = str(e.value)
    assert msg == "error: /nonexistent-folder/x.json: No such file or directory; check the path and rerun"


@pytest.mark.parametrize("extra, needle", [(["--device", "gpu"], "--device 'gpu'"),
                                           (["--lr", "nan"], "--lr nan must be a finite number"),
                                           (["--wd", "inf"], "--wd inf must be a finite number")])
def test_bad_flag_values_are_one_line_errors(extra, needle, data8, tiny_clip_path, tmp_path):
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, tmp_path / "run", *extra))
    assert needle in msg


# ---------------------------------------------------------------------------------------------
# the gallery cache keyed by contents

def test_cache_keyed_by_contents_notices_an_image_replaced_in_place(tiny_clip, tmp_path, capsys):
    from features import Encoding, gallery_features
    from feature_store import EvalCache, images_content_fingerprint
    from datasets import CIRCODataset

    root = small_circo(tmp_path / "CIRCO", [4, 8, 15, 16, 23, 42])
    pre = build_transform("targetpad", tiny_clip.image_size)
    enc = Encoding(batch_size=4, workers=0, device="cpu", progress=False)
    img = root / "COCO2017_unlabeled" / "unlabeled2017" / f"{15:012d}.jpg"

    def run(hash_contents):
        capsys.readouterr()
        before = enc.counters.gallery_images_encoded
        gallery_features(tiny_clip, CIRCODataset(root, "val", "gallery", pre), enc, EvalCache(tmp_path / "c", hash_contents))
        return enc.counters.gallery_images_encoded - before, capsys.readouterr().out

    for hash_contents in (False, True):
        run(hash_contents)
    n, log = run(False)
    assert n == 0 and "keyed by their sizes and modification times; --cache-hash-images" in log
    # another image of the same size and modification time, written in place
    st = img.stat()
    data = bytearray(img.read_bytes())
    assert data[6:11] == b"JFIF\x00"
    data[15] ^= 0x01  # the JFIF header's horizontal density: other bytes, the same pixels
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size == st.st_size
    assert run(False)[0] == 0  # not noticed by the default key
    n, log = run(True)
    assert n == 6 and "stale" in log and "images_sha256" in log
    ds = CIRCODataset(root, "val", "gallery", pre)
    import hashlib

    plain = hashlib.sha256(b"".join(hashlib.sha256(Path(p).read_bytes()).digest() for p in ds.gallery_paths)).hexdigest()
    assert images_content_fingerprint(ds, threads=3) == plain == images_content_fingerprint(ds, threads=1)


# ---------------------------------------------------------------------------------------------
# two bugs

def test_a_row_without_a_star_after_truncation_gets_no_attribute_slots(tiny_clip, monkeypatch):
    import models

    pb = PromptBuilder(tiny_clip.tokenizer)
    long_subject = "a " + " ".join(["very"] * 75) + " dog"
    texts = pb.training_texts(["a cat", long_subject], ["on a mat", "in a park"])
    r = torch.tensor([3, 2])
    ids, _, _ = pb.assemble(texts["attr_head"], texts["attr_head_len"], r, r_max=12)
    assert not (ids[1] == pb.star).any() and (ids[0] == pb.star).sum() == 3
    start, slots = attribute_slots(ids, pb.star, r)
    assert slots.tolist() == [3, 0] and start[0] == int((ids[0] == pb.star).nonzero()[0])
    # in the network: the starless row's embeddings are left as they are (<sot> and its first words too)
    calls = []
    original = models.substitute
    monkeypatch.setattr(models, "substitute", lambda x, *a, **k: calls.append((x, original(x, *a, **k))) or calls[-1][1])
    torch.manual_seed(0)
    net = FTI4CIR.for_clip(tiny_clip, mapper_dropout=0.0)
    images = torch.randn(2, 3, tiny_clip.image_size, tiny_clip.image_size)
    with torch.no_grad():
        out = net(tiny_clip, *tiny_clip.encode_visual(images), texts)
    x_in, x_out = calls[-1]  # the attributes-only sentence
    assert torch.equal(x_in[1], x_out[1]) and not torch.equal(x_in[0], x_out[0])
    assert torch.isfinite(out["total"])


def test_checkpoints_record_the_architecture_of_the_weights(tmp_path, tiny_clip_path):
    from clip_loader import load_clip, openai_architecture
    from toy.tiny_clip import build_tiny_clip

    clip = load_clip("ViT-L/14", tiny_clip_path)  # the default --clip-model, other weights
    assert clip.name != "ViT-L-14" and clip.name.startswith("ViT (width 128, 2 layers, patch 8, 32 px")
    net = FTI4CIR.for_clip(clip)
    save_network(net, tmp_path / "n.pt")
    assert load_checkpoint(tmp_path / "n.pt")["config"]["clip_model"] == clip.name
    b16 = build_tiny_clip(vision_width=768, vision_layers=12, patch_size=16, image_size=224, embed_dim=512)
    b32 = build_tiny_clip(vision_width=768, vision_layers=12, patch_size=32, image_size=224, embed_dim=512)
    assert (openai_architecture(b16), openai_architecture(b32)) == ("ViT-B-16", "ViT-B-32")


# ---------------------------------------------------------------------------------------------
# more of the same kind

def test_resume_from_a_network_only_checkpoint_is_named(data8, tiny_clip_path, tiny_clip, tmp_path):
    path = tmp_path / "net.pt"
    save_network(FTI4CIR.for_clip(tiny_clip), path)
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, tmp_path / "run", "--resume", path, "--batch-size", 4))
    assert str(path) in msg and "not a training checkpoint" in msg and "optimizer" in msg


def test_a_full_disk_is_one_line_and_the_old_file_stays(monkeypatch, tmp_path):
    import errno

    import utils

    target = tmp_path / "metrics.json"
    utils.atomic_write_json({"old": 1}, target)

    def full(fd):  # the new file's bytes cannot all reach the disk
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    @cli.script_main
    def main(argv=None):
        return utils.atomic_write_json({"new": 1}, target)

    monkeypatch.setattr(os, "fsync", full)
    msg = _exit_message(main, [])
    monkeypatch.undo()
    assert f"{target}: No space left on device" in msg and "free disk space" in msg
    assert json.loads(target.read_text()) == {"old": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# --- runs and checkpoints

def _sha256_16(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_the_clip_fingerprint_is_of_the_weights_alone(tiny_clip_path, tmp_path):
    import shutil

    from clip_loader import load_clip, weights_digest
    from toy.tiny_clip import save_tiny_clip

    other = save_tiny_clip(tmp_path / "other.pt", seed=1)  # the same shapes, other weights
    copy = tmp_path / "copy.pt"
    shutil.copyfile(tiny_clip_path, copy)
    a, b, again = (load_clip("ViT-L/14", p) for p in (tiny_clip_path, other, copy))
    fp = a.weights_fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert b.weights_fingerprint() != fp and again.weights_fingerprint() == fp  # another file, the same weights
    state = {k: v.clone() for k, v in a.model.state_dict().items()}
    assert weights_digest(state) == fp
    state["visual.proj"][0, 0] += 1.0  # one sampled value moved
    assert weights_digest(state) != fp
    held = load_clip("ViT-L/14", copy)
    held.hold_visual_weights_in(torch.bfloat16)  # a speed option's cast, before any fingerprint: not another CLIP
    assert held.visual_dtype == torch.bfloat16 and held.weights_fingerprint() == fp


@pytest.fixture(scope="module")
def stopped_run(data8, tiny_clip_path, tmp_path_factory):
    """A run of batch 2 stopped at global step 3 (6 of the 8 samples of epoch 1 done): latest.pt."""
    model_dir = tmp_path_factory.mktemp("stopped") / "run"
    train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 2, "--epochs", 1, "--max-steps", 3,
                          "--no-progress"))
    return model_dir / "checkpoints" / "latest.pt"


def _fewer_pairs(data8: Path, root: Path, keep: int) -> Path:
    """A pairs file listing the first `keep` of data8's images (the images themselves shared)."""
    root.mkdir()
    (root / "test").symlink_to(data8 / "test")
    (root / "pairs.json").write_text(json.dumps(json.loads((data8 / "pairs.json").read_text())[:keep]))
    return root


def test_a_checkpoint_records_its_clip_and_data_and_a_resume_checks_them(stopped_run, data8, tiny_clip_path,
                                                                         tiny_clip, tmp_path, capsys):
    import warnings

    from toy.tiny_clip import save_tiny_clip

    state = load_checkpoint(stopped_run)
    assert state["clip_fingerprint"] == tiny_clip.weights_fingerprint()
    assert state["data"] == {"pairs_file": str(data8 / "pairs.json"), "pairs_sha256": _sha256_16(data8 / "pairs.json"),
                             "images": 8}
    assert (state["epoch"], state["samples_in_epoch"]) == (0, 6)

    def resume(model_dir, data, clip, *extra):
        return train_args(data, clip, model_dir, "--batch-size", 2, "--epochs", 1, "--no-progress",
                          "--resume", stopped_run, *extra)

    other_clip = save_tiny_clip(tmp_path / "other_clip.pt", seed=1)
    msg = _exit_message(train.main, resume(tmp_path / "a", data8, other_clip))
    assert "other CLIP weights" in msg and state["clip_fingerprint"] in msg and "--allow-changes" in msg
    assert str(other_clip.resolve()) in msg and str(tiny_clip_path.resolve()) in msg  # old and new sources
    assert not (tmp_path / "a" / "hyperparameters.json").exists()

    six = _fewer_pairs(data8, tmp_path / "six", 6)
    msg = _exit_message(train.main, resume(tmp_path / "b", six, tiny_clip_path))
    assert "other data" in msg and "8 images" in msg and "6 images" in msg and "--allow-changes" in msg
    assert state["data"]["pairs_sha256"] in msg and _sha256_16(six / "pairs.json") in msg
    four = _fewer_pairs(data8, tmp_path / "four", 4)  # 6 samples done: past the end of 4
    for extra in ((), ("--allow-changes",)):
        msg = _exit_message(train.main, resume(tmp_path / "c", four, tiny_clip_path, *extra))
        assert ("past the end" in msg and "4 images" in msg) if extra else "other data" in msg
    capsys.readouterr()

    # --allow-changes: one line for the CLIP; a changed hyper-parameter: one log line, no Python warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train.main(resume(tmp_path / "d", data8, other_clip, "--allow-changes", "--lr", 1e-3))
    out = capsys.readouterr().out.splitlines()
    assert result["global_step"] == 4
    assert len([x for x in out if "over other CLIP weights" in x]) == 1
    assert len([x for x in out if "different hyper-parameters" in x and "lr: 4e-05 -> 0.001" in x]) == 1
    assert not [w for w in caught if "hyper-parameters" in str(w.message) or "CLIP" in str(w.message)]
    resumed = load_checkpoint(tmp_path / "d" / "checkpoints" / "latest.pt")
    assert resumed["clip_fingerprint"] != state["clip_fingerprint"]


def test_checkpoints_without_the_records_still_resume_and_evaluate(stopped_run, data8, tiny_clip_path, tiny_clip,
                                                                  tmp_path, capsys):
    from checkpoint import load_model

    state = load_checkpoint(stopped_run)
    del state["clip_fingerprint"], state["data"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    capsys.readouterr()
    train.main(train_args(data8, tiny_clip_path, tmp_path / "run", "--batch-size", 2, "--epochs", 1, "--no-progress",
                          "--resume", old))
    out = capsys.readouterr().out.splitlines()
    assert len([x for x in out if "not checked" in x]) == 1
    assert any("does not record the CLIP or the data" in x for x in out)
    net = load_model(str(old), tiny_clip)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "its CLIP is not recorded" in out[0] and "warning" not in out[0]
    assert net.loaded_from["clip_fingerprint"] == {"checkpoint": None, "loaded": tiny_clip.weights_fingerprint()}


def test_evaluation_warns_of_another_clip_and_records_the_checkpoint(stopped_run, tiny_clip_path, tiny_clip, tmp_path,
                                                                      capsys):
    import numpy as np

    import evaluate
    from helpers import KEYS, make_cirr
    from toy.tiny_clip import save_tiny_clip

    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(0), n_images=8, n_queries=2)
    other_clip = save_tiny_clip(tmp_path / "other_clip.pt", seed=1)
    state = load_checkpoint(stopped_run)
    base = ["--dataset", "cirr", "--cirr-path", str(root), "--model-path", str(stopped_run), "--device", "cpu",
            "--workers", "0", "--no-progress", "--no-cache", "--batch-size", "8"]
    for clip, out_dir in ((tiny_clip_path, tmp_path / "same"), (other_clip, tmp_path / "other")):
        capsys.readouterr()
        metrics = evaluate.main(base + ["--clip-weights", str(clip), "--save-path", str(out_dir)])
        lines = [x for x in capsys.readouterr().out.splitlines() if "other CLIP weights" in x]
        assert list(json.loads((out_dir / "metrics_cirr.json").read_text())) == KEYS["cirr"] == list(metrics)
        record = json.loads((out_dir / "metrics_cirr.checkpoint.json").read_text())
        loaded = tiny_clip.weights_fingerprint() if clip == tiny_clip_path else None
        assert record["metrics"] == "metrics_cirr.json" and record["model_path"] == str(stopped_run)
        assert (record["global_step"], record["epoch"]) == (3, 0)
        assert record["clip_fingerprint"]["checkpoint"] == state["clip_fingerprint"]
        if loaded is not None:
            assert record["clip_fingerprint"]["loaded"] == loaded and not lines
        else:
            assert record["clip_fingerprint"]["loaded"] not in (None, state["clip_fingerprint"])
            assert len(lines) == 1 and lines[0].startswith("warning: ") and state["clip_fingerprint"] in lines[0]
            assert record["clip_fingerprint"]["loaded"] in lines[0]


def test_resuming_the_authors_file_says_it_holds_only_the_network(data8, tiny_clip_path, tmp_path, monkeypatch):
    import types

    i2t = types.ModuleType("i2t_model")

    class IMG2TEXT(torch.nn.Module):  # what recognises their file: a pickle naming their module
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

    IMG2TEXT.__module__, IMG2TEXT.__qualname__ = "i2t_model", "IMG2TEXT"
    i2t.IMG2TEXT = IMG2TEXT
    monkeypatch.setitem(sys.modules, "i2t_model", i2t)
    path = tmp_path / "authors.pt"
    torch.save(IMG2TEXT(), path)
    monkeypatch.delitem(sys.modules, "i2t_model")
    loaded = []
    monkeypatch.setattr(training, "load_clip", lambda *a, **k: loaded.append(1))
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, tmp_path / "run", "--resume", path))
    assert str(path) in msg and "holds only the network" in msg and "cannot be resumed" in msg
    assert f"--model-path {path}" in msg and "no flag" in msg and not loaded and not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, needle", [(("--batch-size", 1), "global batch of 1"), (("--epochs", 0), "--epochs 0"),
                                           (("--batch-size", 64), "no full batch of 64"),
                                           (("--pairs-path", "nowhere.json"), "nowhere.json"),
                                           (("--clip-weights", "nowhere.pt", "--batch-size", 4),
                                            "--clip-weights nowhere.pt: no such file")])
def test_a_run_that_cannot_train_is_refused_before_anything_is_written(extra, needle, data8, tiny_clip_path, tmp_path):
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, tmp_path / "run" / "inner", *extra))
    assert needle in msg and not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset", ["cirr", "circo", "fashioniq"])
def test_a_validation_folder_without_the_layout_is_refused_before_training(dataset, data8, tiny_clip_path, tmp_path,
                                                                            monkeypatch):
    loaded = []
    monkeypatch.setattr(training, "load_clip", lambda *a, **k: loaded.append(1))
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, tmp_path / "run", "--val-dataset", dataset,
                                               "--val-data-path", empty))
    assert f"--val-dataset {dataset} --val-data-path {empty}: " in msg and f"check_data.py --{dataset}-path" in msg
    assert "\n" not in msg and not loaded and not (tmp_path / "run").exists()


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 832 vs 768: No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
    OSError(28, "No space left on device"),  # a write or fsync names no file
])
def test_a_failed_first_write_is_one_line_naming_the_file_and_the_next_run_starts(failure, data8, tiny_clip_path,
                                                                                   tmp_path, monkeypatch):
    model_dir = tmp_path / "run"
    args = train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 1, "--no-progress")
    msg = _exit_message(train.main, train_args(data8, tmp_path / "no-clip.pt", model_dir, "--batch-size", 4))
    assert "no-clip.pt" in msg  # a CLIP that does not load: nothing left that blocks the next run

    def full(obj, f, *a, **k):
        raise failure

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full)
        msg = _exit_message(train.main, args)
    target = model_dir / "checkpoints" / "epoch_1.pt"
    assert msg.startswith(f"error: {target}: ") and "free disk space" in msg
    assert ("No space left on device" in msg) == ("No space" in str(failure))
    assert not (model_dir / "hyperparameters.json").exists() and not (model_dir / "train_log.jsonl").exists()
    assert not model_dir.exists()  # the folders this start created, empty, are gone too
    if isinstance(failure, OSError):
        assert train.main(args)["global_step"] == 2  # the next plain run, without --resume


def test_a_failed_step_log_write_names_the_log(data8, tiny_clip_path, tmp_path, monkeypatch):
    from logs import TrainLog

    def full(self, record, global_step):
        raise OSError(28, "No space left on device")  # a write to an open file names no file

    monkeypatch.setattr(TrainLog, "step", full)
    model_dir = tmp_path / "run"
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--epochs", 1))
    assert msg.startswith(f"error: {model_dir / 'train_log.jsonl'}: No space left on device")
    assert not (model_dir / "train_log.jsonl").exists()  # the failed start's files are gone


# ---------------------------------------------------------------------------------------------
# files, folders and pictures

def _dead_pid() -> int:
    """The pid of a process that has ended (no process of this host has it now)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_lock_file_that_is_a_link_or_not_a_file_is_refused(data8, tiny_clip_path, tmp_path):
    from errors import UserError

    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(outside)
    with pytest.raises(UserError) as e:
        RunLock(run).acquire()
    assert f"{run / LOCK_NAME} is a symbolic link" in str(e.value) and "\n" not in str(e.value)
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, run, "--batch-size", 4))
    assert f"{run / LOCK_NAME} is a symbolic link" in msg
    assert outside.read_text() == "not the run's" and (run / LOCK_NAME).is_symlink()
    (run / LOCK_NAME).unlink()
    os.mkfifo(run / LOCK_NAME)
    with pytest.raises(UserError, match="is not a regular file"):
        RunLock(run).acquire()


def test_a_training_log_that_is_a_link_is_refused(tmp_path):
    from logs import TrainLog
    from utils import UnsafeFileError

    outside = tmp_path / "outside.jsonl"
    outside.write_text("theirs\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").symlink_to(outside)
    with pytest.raises(UnsafeFileError, match=f"{run / 'train_log.jsonl'} is a symbolic link"):
        TrainLog(run, enabled=True)
    assert outside.read_text() == "theirs\n" and sorted(os.listdir(run)) == ["train_log.jsonl"]
    # a run's own log: appended to, as before
    (run / "train_log.jsonl").unlink()
    (run / "train_log.jsonl").write_text('{"step": 0}\n')
    log = TrainLog(run, enabled=True)
    log.step({"step": 1, "loss": 0.5}, 1)
    log.close()
    assert (run / "train_log.jsonl").read_text() == '{"step": 0}\n{"step": 1, "loss": 0.5}\n'


def test_an_atomic_write_replaces_a_link_and_never_writes_through_it(tmp_path):
    from utils import atomic_write_json

    outside = tmp_path / "outside.json"
    outside.write_text("theirs")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").symlink_to(outside)
    atomic_write_json({"a": 1}, tmp_path / "out" / "results.json")
    assert outside.read_text() == "theirs" and not (tmp_path / "out" / "results.json").is_symlink()
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"a": 1}
    assert os.listdir(tmp_path / "out") == ["results.json"]


def test_output_folders_lose_the_temporaries_of_dead_processes_only(tmp_path, capsys):
    from utils import HOST, check_output_folder

    out = tmp_path / "save"
    out.mkdir()
    dead = _dead_pid()
    gone = [f".results.json.{HOST}.{dead}.0badc0de.tmp", f".results.png.{HOST}.{dead}.12345678.tmp"]
    kept = [f".results.json.{HOST}.{os.getpid()}.deadbeef.tmp",  # a running process's
            f".results.json.other-host.{dead}.0badc0de.tmp",  # another machine's: its pid cannot be told
            "notes.tmp", "results.json"]
    for name in gone + kept:
        (out / name).write_text("x")
    check_output_folder(out, "--save-path")
    assert sorted(os.listdir(out)) == sorted(kept)
    printed = capsys.readouterr().out
    assert all(f"--save-path: removed {out / name}, left by process {dead}" in printed for name in gone)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "./dev/../../outside.png"])
def test_annotation_paths_outside_the_dataset_are_refused(bad, tmp_path):
    root = _cirr(tmp_path, [_entry(1)])
    split = root / "cirr" / "image_splits" / "split.rc2.val.json"
    names = json.loads(split.read_text())
    names["dev-3-0-img0"] = bad
    split.write_text(json.dumps(names))
    with pytest.raises(AnnotationFormatError) as e:
        CIRRDataset(root, "val", "gallery", build_transform("clip", 32))
    msg = str(e.value)
    assert msg.startswith(f"{split}: entry 'dev-3-0-img0' names the image {bad!r}, which lies outside {root}")
    assert "\n" not in msg
    # CIRCO's gallery file names: relative to its image folder
    circo = small_circo(tmp_path / "CIRCO", [1, 2, 3], with_images=False)
    info = circo / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    images = json.loads(info.read_text())
    images["images"][2]["file_name"] = bad
    info.write_text(json.dumps(images))
    from datasets import CIRCODataset

    with pytest.raises(AnnotationFormatError, match=f"entry 2 names the image {bad!r}"):
        CIRCODataset(circo, "val", "gallery", build_transform("clip", 32), require_images=False)


def test_fashioniq_names_outside_the_dataset_are_refused_and_links_inside_are_allowed(tmp_path):
    import numpy as np

    from datasets import FashionIQDataset
    from helpers import make_fashioniq

    root = make_fashioniq(tmp_path / "FIQ", np.random.default_rng(0), n_images=4, n_queries=2)
    caps = root / "captions" / "cap.dress.val.json"
    entries = json.loads(caps.read_text())
    entries[1]["candidate"] = "../../../home/x"
    caps.write_text(json.dumps(entries))
    with pytest.raises(AnnotationFormatError, match=r"cap.dress.val.json: entry 1 names the image '../../../home/x.jpg'"):
        FashionIQDataset(root, "val", ["dress"], "query", build_transform("clip", 32))
    # a link inside the root that points elsewhere is the user's layout
    elsewhere = tmp_path / "disk2"
    (root / "shirt").rename(elsewhere)
    (root / "shirt").symlink_to(elsewhere, target_is_directory=True)
    assert len(FashionIQDataset(root, "val", ["shirt"], "gallery", build_transform("clip", 32)).names) == 4


def test_folder_walks_list_each_real_folder_once(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from datasets import list_images

    g = tmp_path / "g"
    (g / "a" / "b").mkdir(parents=True)
    for rel in ("x.jpg", "a/y.png", "a/b/z.webp"):
        Image.new("RGB", (8, 8)).save(g / rel)
    (g / "a" / "b" / "up").symlink_to("..", target_is_directory=True)  # a link to a parent
    (g / "here1").symlink_to(".", target_is_directory=True)  # two links to the folder itself
    (g / "here2").symlink_to(".", target_is_directory=True)
    (g / "also_a").symlink_to("a", target_is_directory=True)
    outside = tmp_path / "more"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "w.jpg")
    (g / "a" / "more").symlink_to(outside, target_is_directory=True)  # a folder reached only through a link
    (g / "more2").symlink_to(outside, target_is_directory=True)
    got = list_images(g)
    assert sorted(got) == got and len(got) == 4
    assert {"a/b/z.webp", "a/y.png", "x.jpg"} < set(got) and len(set(got) & {"a/more/w.jpg", "more2/w.jpg"}) == 1
    # a folder that cannot be listed is named, not passed over in silence
    real_scandir = os.scandir

    def scandir(path):
        if os.path.basename(path) == "b":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert list_images(g) == sorted(set(got) - {"a/b/z.webp"})
    assert f"warning: {g / 'a' / 'b'}: cannot be listed (Permission denied); its files are left out" in capsys.readouterr().out


def test_odd_queries_are_counted_in_one_warning_line_per_split(tmp_path, capsys):
    root = _cirr(tmp_path, [_entry(1), _entry(2, caption=" "), _entry(3, caption=""),
                            _entry(4, target_hard="dev-0-0-img0")])
    CIRRDataset(root, "val", "query", build_transform("clip", 32))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert lines == [f"warning: cirr-val: 2 with an empty relative caption and 1 whose target is the reference image, "
                     f"of 4 queries ({root / 'cirr' / 'captions' / 'cap.rc2.val.json'})"]
    CIRRDataset(root, "val", "query", build_transform("clip", 32))  # the same split read again: said once
    assert "warning" not in capsys.readouterr().out
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps([_entry(1), _entry(2)]))
    CIRRDataset(root, "val", "query", build_transform("clip", 32))
    assert "warning" not in capsys.readouterr().out


def _authors_transform(image, kind: str, size: int):
    """The authors' preprocessing written out step by step (METHOD §9): the pad, bicubic resize, centre
    crop, RGB conversion, tensor, CLIP normalisation; what RGB, RGBA and L images must still get."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from transforms import CLIP_MEAN, CLIP_STD

    w, h = image.size
    if kind == "targetpad" and max(w, h) / min(w, h) >= 1.25:
        m = max(w, h) / 1.25
        image = TF.pad(image, [max(int((m - w) / 2), 0), max(int((m - h) / 2), 0)] * 2, fill=0, padding_mode="constant")
    image = TF.center_crop(TF.resize(image, size, interpolation=InterpolationMode.BICUBIC), size)
    return TF.normalize(TF.to_tensor(image.convert("RGB")), CLIP_MEAN, CLIP_STD)


def test_pictures_of_every_mode_enter_the_pipeline_in_eight_bits(tmp_path):
    import numpy as np
    from PIL import Image

    from datasets import load_image

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (30, 52), dtype=np.uint8)
    grey[0, 0], grey[0, 1] = 0, 255  # the full range, for the float image's own range
    colour = rng.integers(0, 256, (52, 30, 3), dtype=np.uint8)
    for kind in ("targetpad", "clip"):
        t = build_transform(kind, 32)
        # RGB, RGBA and L: exactly the authors' tensors
        for image in (Image.fromarray(colour), Image.fromarray(grey), Image.fromarray(colour).convert("RGBA"),
                      Image.fromarray(colour[:40, :36])):
            assert torch.equal(t(image), _authors_transform(image, kind, 32)), (kind, image.mode, image.size)
        want = t(Image.fromarray(grey))
        # 16-bit grey, read back from a 16-bit PNG: scaled by 65535 / 255 = 257, the same picture as the L one
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
        sixteen = load_image(tmp_path / "g16.png")
        assert sixteen.mode in ("I;16", "I") and torch.equal(t(sixteen), want)
        assert torch.equal(t(Image.fromarray(grey.astype(np.int32) * 257, "I")), want)
        # float grey: scaled from its own range (here 1.0 .. 4.0)
        assert torch.equal(t(Image.fromarray(grey.astype(np.float32) / 255 * 3 + 1, "F")), want)
        # CMYK and palette: PIL's conversion to RGB, before the pad
        for image in (Image.fromarray(colour).convert("CMYK"), Image.fromarray(colour).convert("P")):
            assert torch.equal(t(image), _authors_transform(image.convert("RGB"), kind, 32)), (kind, image.mode)


def test_a_decompression_bomb_is_named_with_how_to_raise_the_limit(tmp_path, monkeypatch):
    from PIL import Image

    from datasets import PIXEL_LIMIT_ENV, ImageLoadError, load_image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "big.png")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'big.png'}: refused as a possible decompression bomb") and "\n" not in msg
    assert f"{PIXEL_LIMIT_ENV}=<pixels>" in msg and "corrupt" not in msg and "truncated" not in msg
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "5000")
    assert load_image(tmp_path / "big.png").size == (64, 64)


def test_retrieve_skips_unreadable_gallery_images_only_when_asked(fast_clip, eval_args, net_path, tmp_path, capsys):
    from PIL import Image

    from retrieve import main as retrieve_main

    g = tmp_path / "g"
    g.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 16), (60 * i, 30, 200 - 40 * i)).save(g / f"ok{i}.png")
    (g / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a picture")
    (g / "empty.png").write_bytes(b"")
    (g / "loop").symlink_to(".", target_is_directory=True)  # listed once, not again through the link
    argv = eval_args + ["--model-path", str(net_path), "--gallery", str(g), "--reference", str(g / "ok0.png"),
                        "--text", "is red", "--top", "10"]
    msg = _exit_message(retrieve_main, argv)
    assert str(g / "broken.jpg") in msg and "cannot decode" in msg
    capsys.readouterr()
    out = retrieve_main(argv + ["--skip-bad-images"])
    assert out["gallery_images"] == 4 and sorted(r["file"] for r in out["queries"][0]["results"]) == \
        [f"ok{i}.png" for i in range(4)]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: left out 2 of the 6 images under {g} that cannot be read: broken.jpg, empty.png (the first: {g / 'broken.jpg'}")


# --- more bad input: text encodings, folders where files belong, values out of range

def test_annotation_file_not_utf8_is_one_line(tmp_path):
    import numpy as np

    from helpers import make_cirr

    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(0))
    captions = root / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(captions.read_text())
    entries[0]["caption"] = "is caf\u00e9 coloured"
    captions.write_bytes(json.dumps(entries, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(AnnotationFormatError, match=r"cap\.rc2\.val\.json: not UTF-8 text .*save it as UTF-8"):
        CIRRDataset(root, "val", "query", build_transform("clip", 32), require_images=False)


def test_image_path_that_is_a_folder_says_so(tmp_path):
    from datasets import ImageLoadError, load_image

    (tmp_path / "x.png").mkdir()
    with pytest.raises(ImageLoadError, match=r"x\.png: is a folder, not an image file"):
        load_image(tmp_path / "x.png")


def test_model_path_that_is_a_folder_says_so(tmp_path):
    from errors import UserError

    with pytest.raises(UserError, match="is a folder, not a checkpoint file"):
        load_network(tmp_path)


@pytest.mark.parametrize("script, flags, needle", [
    ("evaluate", ["--dataset", "cirr", "--save-examples", "-1"], "--save-examples -1 (must be >= 0)"),
    ("evaluate", ["--dataset", "cirr", "--workers", "-1"], "--workers -1 (must be >= 0)"),
    ("retrieve", ["--gallery", ".", "--reference", "a.png", "--text", "x", "--top", "0"], "--top 0 (must be >= 1)"),
])
def test_values_out_of_range_are_refused_before_clip_loads(script, flags, needle, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(module, "load_clip", lambda *a, **k: pytest.fail("CLIP loaded before the flags were checked"))
    msg = _exit_message(module.main, [*flags, "--device", "cpu", "--save-path", str(tmp_path / "out")])
    assert needle in msg and "--batch-size" not in msg


def test_val_batch_size_zero_refused_before_anything_is_written(data8, tiny_clip_path, tmp_path):
    msg = _exit_message(train.main, train_args(data8, tiny_clip_path, tmp_path / "run", "--val-batch-size", 0))
    assert "--val-batch-size 0 (must be >= 1)" in msg and not (tmp_path / "run").exists()
