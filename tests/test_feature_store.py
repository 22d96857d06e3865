"""The feature store (src/feature_store.py) and train.py --cache-image-features (src/train_features.py) on
CPU with a tiny random CLIP and generated JPEGs: the stored rows, no image/visual pass for cached rows,
numerics against the uncached path, stale and foreign store folders, mixed batches, resume, the writer
thread, one store per node, disk space, links and leftover temporaries."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datasets
import feature_store
import train
import train_features
from checkpoint import load_checkpoint
from clip_loader import FrozenCLIP
from distributed import DistInfo
from errors import UserError
from helpers import ddp_train_worker, free_port, make_pairs_data, read_log, small_circo
from transforms import build_transform

LR = 4e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tiny models run on one thread


def args_for(data: Path, clip: Path, model_dir: Path, cache_dir: Path | None, *extra) -> list[str]:
    a = ["--imagenet-path", data, "--clip-weights", clip, "--model-dir", model_dir, "--device", "cpu",
         "--workers", 0, "--precision", "fp32", "--lr", LR, *extra]
    if cache_dir is not None:
        a += ["--cache-image-features", "--feature-cache-dir", cache_dir]
    return list(map(str, a))


def state(model_dir: Path, name: str = "latest.pt") -> dict:
    return load_checkpoint(model_dir / "checkpoints" / name)["state_dict"]


def folders(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir())


def open_arrays(folder: Path):
    return (np.load(folder / "g.npy", mmap_mode="r"), np.load(folder / "P.npy", mmap_mode="r"),
            np.load(folder / "filled.npy", mmap_mode="r"))


class Events:
    """Records image decodes, visual passes and cached training steps, in order."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.seq = []
        load, tokens, step = datasets.load_image, FrozenCLIP.encode_visual, train_features.CachedTowerFeatures.__call__
        mp.setattr(datasets, "load_image", lambda p: self.seq.append("load") or load(p))
        mp.setattr(FrozenCLIP, "encode_visual", lambda s, x: self.seq.append(f"visual{len(x)}") or tokens(s, x))
        mp.setattr(train_features.CachedTowerFeatures, "__call__", lambda *a, **k: self.seq.append("step") or step(*a, **k))

    def clear(self) -> list[str]:
        seq, self.seq[:] = list(self.seq), []
        return seq


def round_visual_pass(mp: pytest.MonkeyPatch) -> None:
    """The uncached path with g and P rounded to fp16: what the cache must feed the network."""
    original = train_features.TowerFeatures.encode
    mp.setattr(train_features.TowerFeatures, "encode", lambda self, images: tuple(t.half().float() for t in original(self, images)))


# ---------------------------------------------------------------------------------------------
# one cached 2-epoch run (batch 4: 2 steps per epoch) and its uncached counterparts

@pytest.fixture(scope="module")
def runs(data8, tiny_clip_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = ["--batch-size", 4, "--epochs", 2]
    with pytest.MonkeyPatch.context() as mp:
        events = Events(mp)
        train.main(args_for(data8, tiny_clip_path, root / "cached", root / "cache", *common))
        seq = events.clear()
    train.main(args_for(data8, tiny_clip_path, root / "plain", None, *common))
    with pytest.MonkeyPatch.context() as mp:
        round_visual_pass(mp)
        train.main(args_for(data8, tiny_clip_path, root / "rounded", None, *common))
    return root, seq


def test_first_epoch_stores_the_fp16_visual_outputs(runs, data8, tiny_clip):
    root, _ = runs
    (folder,) = folders(root / "cache")
    g, P, filled = open_arrays(folder)
    assert filled.all() and g.dtype == P.dtype == np.float16
    ds = datasets.ImageNetPairsDataset(data8, data8 / "pairs.json", build_transform("targetpad", tiny_clip.image_size))
    with torch.no_grad():
        g_ref, P_ref = tiny_clip.encode_visual(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    assert g.shape == tuple(g_ref.shape) and P.shape == tuple(P_ref.shape)
    # one batch of 8 here, two shuffled batches of 4 in training: float sums may differ in the last fp32
    # bit, which can move an fp16 rounding by one fp16 step (relative 2^-10) in rare elements
    for stored, ref in ((g, g_ref), (P, P_ref)):
        stored = torch.from_numpy(np.array(stored))
        torch.testing.assert_close(stored.float(), ref.half().float(), rtol=2 ** -10, atol=1e-6)
        assert (stored == ref.half()).float().mean() > 0.99
    meta = json.loads((folder / "meta.json").read_text())
    key = meta["key"]
    assert key["transform"].startswith("TargetPad(target_ratio=1.25) | Resize(size=32")
    assert key["clip"]["image_size"] == tiny_clip.image_size and key["dtype"] == "float16"
    assert key["num_images"] == 8 and meta["arrays"]["P"]["shape"] == list(P.shape)
    assert folder.name == feature_store.folder_name(key)


def test_second_epoch_decodes_no_image_and_skips_the_visual_tower(runs):
    _, seq = runs
    # workers 0: a batch is loaded right before its step; epoch 1 decodes and encodes every image once
    epoch1 = (["load"] * 4 + ["step", "visual4"]) * 2
    assert seq == epoch1 + ["step", "step"]


def test_cached_run_feeds_the_fp16_rounded_features(runs):
    root, _ = runs
    cached, rounded, plain = (read_log(root / n) for n in ("cached", "rounded", "plain"))
    assert len(cached) == 4
    # the cache path feeds exactly the numbers of the uncached path with g and P rounded to fp16
    # (same machine, same batches, same operations: bit-identical)
    keys = ("loss", "loss_contrastive", "loss_ortho", "loss_reg", "num_attributes")
    assert [[r[k] for k in keys] for r in cached] == [[r[k] for k in keys] for r in rounded]
    sc, sr, sp = state(root / "cached"), state(root / "rounded"), state(root / "plain")
    assert all(torch.equal(sc[k], sr[k]) for k in sc)
    # against the plain fp32 path: g and P differ by at most 2^-11 relative (fp16 rounding), the losses
    # by about that much; Adam moves each weight by about lr per step whatever the gradient's size, so
    # a rounding-sized gradient change can move a weight by at most ~2 x lr x 4 steps
    for a, b in zip(cached, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    assert all(torch.allclose(sc[k], sp[k], rtol=0, atol=2 * LR * 4) for k in sc)


# ---------------------------------------------------------------------------------------------
# stale and foreign folders

def test_stale_or_foreign_cache_is_not_used(runs, data8, tiny_clip_path, tmp_path, capsys, monkeypatch):
    root, _ = runs
    cache = tmp_path / "cache"
    (src,) = folders(root / "cache")
    shutil.copytree(src, cache / src.name)  # a full cache for targetpad and the 8-image list
    g_before = np.array(np.load(cache / src.name / "g.npy"))
    events = Events(monkeypatch)
    capsys.readouterr()

    # another preprocessing
    train.main(args_for(data8, tiny_clip_path, tmp_path / "m1", cache, "--batch-size", 4, "--epochs", 1,
                        "--preprocess-type", "clip"))
    out = capsys.readouterr().out
    assert f"{cache / src.name} not used (stale: made for other transform)" in out
    assert events.clear().count("load") == 8  # nothing came from the targetpad cache
    assert len(folders(cache)) == 2 and np.array_equal(np.load(cache / src.name / "g.npy"), g_before)

    # another image list (the first 4 pairs)
    pairs = json.loads((data8 / "pairs.json").read_text())[:4]
    (tmp_path / "pairs4.json").write_text(json.dumps(pairs))
    train.main(args_for(data8, tiny_clip_path, tmp_path / "m2", cache, "--batch-size", 4, "--epochs", 1,
                        "--pairs-path", tmp_path / "pairs4.json"))
    out = capsys.readouterr().out
    assert f"{cache / src.name} not used (stale: made for other" in out and "names_sha256" in out
    assert events.clear().count("load") == 4 and len(folders(cache)) == 3

    # the right key's folder with a foreign meta.json (or one edited by hand): replaced, not trusted
    meta = json.loads((cache / src.name / "meta.json").read_text())
    meta["key"]["clip"]["image_size"] = 999
    (cache / src.name / "meta.json").write_text(json.dumps(meta))
    train.main(args_for(data8, tiny_clip_path, tmp_path / "m3", cache, "--batch-size", 4, "--epochs", 1))
    out = capsys.readouterr().out
    assert f"{cache / src.name} not used (stale: made for other clip); making a fresh one" in out
    assert events.clear().count("load") == 8
    assert open_arrays(cache / src.name)[2].all()  # refilled by that run


# ---------------------------------------------------------------------------------------------
# mixed batches and resume (batch 2: 4 steps per epoch)

def test_mixed_batches_compute_only_the_missing_rows(runs, data8, tiny_clip_path, tmp_path, monkeypatch):
    root, _ = runs
    cache = tmp_path / "cache"
    train.main(args_for(data8, tiny_clip_path, tmp_path / "prefill", cache, "--batch-size", 2, "--max-steps", 1))
    (folder,) = folders(cache)
    assert open_arrays(folder)[2].sum() == 2  # the first 2 of epoch 1's permutation
    events = Events(monkeypatch)
    train.main(args_for(data8, tiny_clip_path, tmp_path / "mixed", cache, "--batch-size", 4, "--epochs", 1))
    # batch 4 starts with the same permutation: 2 cached + 2 new rows, then 4 new rows
    assert events.clear() == ["load"] * 2 + ["step", "visual2"] + ["load"] * 4 + ["step", "visual4"]
    assert open_arrays(folder)[2].all()
    # the rows computed in a batch of 2 may differ from the batch-of-4 run by one fp16 step in rare elements
    for a, b in zip(read_log(tmp_path / "mixed"), read_log(root / "rounded")[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_resume_with_cache_equals_uninterrupted_cached_run(data8, tiny_clip_path, tmp_path, monkeypatch):
    common = ["--batch-size", 2, "--epochs", 2]
    straight = args_for(data8, tiny_clip_path, tmp_path / "straight", None, *common, "--cache-image-features")
    train.main(straight)  # default location: <imagenet-path>/.fti4cir_cache
    assert open_arrays(folders(data8 / ".fti4cir_cache")[0])[2].all()
    cut = tmp_path / "cut"
    first = train.main(args_for(data8, tiny_clip_path, cut, tmp_path / "cache_b", *common, "--max-steps", 3))
    assert first["stopped_early"] and first["global_step"] == 3
    events = Events(monkeypatch)
    second = train.main(args_for(data8, tiny_clip_path, cut, tmp_path / "cache_b", *common, "--resume", "latest"))
    assert second["global_step"] == 8
    # the rest of epoch 1 (2 never-seen rows) is decoded; epoch 2 comes from the cache
    assert events.clear() == ["load"] * 2 + ["step", "visual2"] + ["step"] * 4
    want, got = state(tmp_path / "straight", "epoch_2.pt"), state(cut, "epoch_2.pt")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in read_log(tmp_path / "straight")] == [r["loss"] for r in read_log(cut)]


def test_flag_help_and_default_location():
    p = train.build_parser()
    help_text = " ".join(p.format_help().split())
    assert "--cache-image-features" in help_text and "52 GB" in help_text
    a = p.parse_args(["--imagenet-path", "/data/in", "--cache-image-features"])
    assert a.cache_image_features and a.feature_cache_dir is None  # resolved in main: <imagenet-path>/.fti4cir_cache


# ---------------------------------------------------------------------------------------------
# DDP: rank 0 creates the folder, each rank writes its own rows

def test_ddp_ranks_fill_their_rows_and_train_like_one_process(runs, data8, tiny_clip_path, tmp_path):
    import torch.multiprocessing as mp

    common = ["--epochs", 2, "--mapper-dropout", 0]  # no dropout: per-rank dropout streams differ
    argv = args_for(data8, tiny_clip_path, tmp_path / "ddp", tmp_path / "cache_ddp", "--batch-size", 2, *common)
    mp.spawn(ddp_train_worker, args=(2, free_port(), argv), nprocs=2, join=True)
    train.main(args_for(data8, tiny_clip_path, tmp_path / "one", tmp_path / "cache_one", "--batch-size", 4, *common))
    (ddp,), (one,) = folders(tmp_path / "cache_ddp"), folders(tmp_path / "cache_one")
    assert ddp.name == one.name  # the same key
    g_d, P_d, filled_d = open_arrays(ddp)
    g_1, P_1, _ = open_arrays(one)
    assert filled_d.all()
    for a, b in ((g_d, g_1), (P_d, P_1)):  # batches of 2 vs 4: at most one fp16 step apart
        torch.testing.assert_close(torch.from_numpy(np.array(a)).float(), torch.from_numpy(np.array(b)).float(),
                                   rtol=2 ** -10, atol=1e-6)
    log_d, log_1 = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert [r["loss"] for r in log_d] == pytest.approx([r["loss"] for r in log_1], abs=1e-5)


def test_unusable_cache_dir_is_named(data8, tiny_clip_path, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=f"--feature-cache-dir {blocker}.*drop --cache-image-features"):
        train.main(args_for(data8, tiny_clip_path, tmp_path / "m", blocker, "--batch-size", 4, "--epochs", 1))


# ---------------------------------------------------------------------------------------------
# the writer thread, commits, reads in DataLoader workers

class FakeClip:
    """What the store asks of a FrozenCLIP (its fingerprint and sizes), without a model."""

    embed_dim, vision_width, image_size = 3, 4, 32

    def __init__(self, source: str = "fake"):
        self.source = source
        self.model = SimpleNamespace(visual=SimpleNamespace(positional_embedding=torch.zeros(2, 4)))

    def fingerprint(self) -> dict:
        return {"source": self.source, "image_size": self.image_size}


def _pairs(data: Path, size: int = 32) -> datasets.ImageNetPairsDataset:
    return datasets.ImageNetPairsDataset(data, data / "pairs.json", build_transform("targetpad", size))


def _tiny_cache(root: Path, data: Path, **kw) -> train_features.RowWriter:
    """The training store of the 8 generated images with g [3] and P [2, 4] rows, opened by one process."""
    return train_features.open_feature_cache(root / "c", FakeClip(), _pairs(data), "fp32", DistInfo(), **kw)


def test_queued_rows_are_stored_then_marked_filled(tmp_path, data8, monkeypatch):
    cache = _tiny_cache(tmp_path, data8)
    g, P = torch.randn(2, 3), torch.randn(2, 2, 4)
    order = []  # the data reaches the file before `filled` vouches for it
    Files = feature_store.RowFiles
    for method, what in (("write_rows", "set"), ("sync", "flush")):
        real = getattr(Files, method)
        monkeypatch.setattr(Files, method, lambda self, name, *a, real=real, what=what:
                            order.append(f"{name}:{what}") or real(self, name, *a))
    real_mark = Files.mark_filled
    monkeypatch.setattr(Files, "mark_filled", lambda self, rows: order.append("filled:set") or real_mark(self, rows))
    g0 = g.clone()
    cache.write(np.array([4, 1]), g, P)
    g[:] = 0  # the caller may reuse its tensors at once: write took its own copy
    cache.commit()
    assert order == ["g:set", "P:set", "g:flush", "P:flush", "filled:set", "filled:flush"]
    g_file, P_file, filled = open_arrays(cache.folder)
    assert filled.tolist() == [False, True, False, False, True, False, False, False]
    assert np.array_equal(g_file[[4, 1]], g0.half().numpy())
    assert np.array_equal(P_file[[4, 1]], P.half().numpy())
    cache.close()
    assert not cache.writing


def test_filled_waits_for_the_flush_every_few_batches(tmp_path, data8):
    cache = _tiny_cache(tmp_path, data8)
    cache.flush_every = 3
    g, P = torch.randn(8, 3).half(), torch.randn(8, 2, 4).half()
    for r in (5, 0):  # two batches: stored, not yet flushed, so not yet marked
        cache.write(np.array([r]), g[[r]], P[[r]])
    cache.drain()
    g_file, _, filled = open_arrays(cache.folder)
    assert not filled.any() and np.array_equal(g_file[[5, 0]], g[[5, 0]].numpy())
    cache.write(np.array([7, 2]), g[[7, 2]], P[[7, 2]])  # the third batch: the flush, then the flags
    cache.drain()
    assert open_arrays(cache.folder)[2].nonzero()[0].tolist() == [0, 2, 5, 7]
    cache.write(np.array([3]), g[[3]], P[[3]])
    cache.close()  # commit flushes what is left
    g_file, P_file, filled = open_arrays(cache.folder)
    assert filled.nonzero()[0].tolist() == [0, 2, 3, 5, 7]
    assert np.array_equal(g_file[[0, 2, 3, 5, 7]], g[[0, 2, 3, 5, 7]].numpy())
    assert np.array_equal(P_file[[0, 2, 3, 5, 7]], P[[0, 2, 3, 5, 7]].numpy())


def test_row_writes_equal_plain_assignment(tmp_path, data8):
    """pwrite of scattered rows (and of runs of filled flags) against numpy's plain assignment."""
    cache = _tiny_cache(tmp_path, data8)
    files = feature_store.RowFiles(cache.store)
    rng = np.random.default_rng(0)
    want_P = np.zeros((8, 2, 4), np.float16)
    want_filled = np.zeros(8, bool)
    for rows in ([6, 1, 3], [0, 7], [2, 5, 4]):
        rows = np.array(rows)
        data = rng.standard_normal((len(rows), 2, 4)).astype(np.float16)
        files.write_rows("P", rows, data)
        want_P[rows] = data
    for rows in ([3, 4, 5, 0], [7], [5, 6]):  # runs and repeats
        files.mark_filled(np.array(rows))
        want_filled[rows] = True
    files.close()
    _, P_file, filled = open_arrays(cache.folder)
    assert np.array_equal(P_file, want_P) and np.array_equal(filled, want_filled)


def test_fp16_finiteness_by_bits_equals_isfinite():
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(5000) * 1e3).astype(np.float16)
    specials = np.array([np.inf, -np.inf, np.nan, 65504, -65504, 6e-8, -0.0], dtype=np.float16)
    cases = [base, base.reshape(50, 100), specials[3:]]
    for v in specials:
        for at in (0, 1023, 1024, 4999):  # inside, at the edges of the 1024-value chunks
            x = base.copy()
            x[at] = v
            cases.append(x.reshape(5, 1000))
    for x in cases:
        assert train_features.finite_fp16(x, chunk=1024) == bool(np.isfinite(x).all()), x
    assert train_features.finite_fp16(np.empty((0, 3), np.float16))


def test_writer_failure_is_raised_and_marks_nothing(tmp_path, data8, monkeypatch):
    cache = _tiny_cache(tmp_path, data8)
    cache.write(np.array([0]), torch.randn(1, 3), torch.randn(1, 2, 4))
    cache.commit()

    def disk_full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feature_store.RowFiles, "write_rows", disk_full)
    assert not cache.failed
    cache.write(np.array([2]), torch.randn(1, 3), torch.randn(1, 2, 4))
    cache.drain()
    assert cache.failed  # said without waiting, for the step's flags
    cache.write(np.array([5]), torch.randn(1, 3), torch.randn(1, 2, 4))  # not queued any more
    with pytest.raises(feature_store.FeatureCacheError, match=f"writing the feature cache {cache.folder} failed.*No space"):
        cache.commit()
    assert open_arrays(cache.folder)[2].tolist() == [True] + [False] * 7
    monkeypatch.undo()
    bad = torch.full((1, 3), float("inf"))
    cache.write(np.array([3]), bad, torch.zeros(1, 2, 4))
    with pytest.raises(feature_store.FeatureCacheError, match=r"training rows \[3\] are not finite"):
        cache.close()
    assert open_arrays(cache.folder)[2].sum() == 1
    # finite in fp32, infinite once rounded to the fp16 the rows are kept in
    cache.write(np.array([4]), torch.full((1, 3), 7e4), torch.zeros(1, 2, 4))
    with pytest.raises(feature_store.FeatureCacheError, match=r"training rows \[4\] are not finite in fp16"):
        cache.close()


def test_a_full_disk_while_writing_is_one_line_not_a_bus_error(tmp_path, data8, monkeypatch):
    cache = _tiny_cache(tmp_path, data8)

    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    cache.write(np.array([1, 2]), torch.randn(2, 3), torch.randn(2, 2, 4))
    with pytest.raises(feature_store.FeatureCacheError) as e:
        cache.close()
    msg = str(e.value)
    assert "\n" not in msg and str(cache.folder) in msg and "No space left on device" in msg
    assert "free disk space or pass another --feature-cache-dir" in msg
    monkeypatch.undo()
    assert not open_arrays(cache.folder)[2].any()


def test_cached_samples_and_collate(tmp_path, data8, tiny_clip):
    base = _pairs(data8, tiny_clip.image_size)
    cache = train_features.open_feature_cache(tmp_path / "c", tiny_clip, base, "fp32", DistInfo())
    shapes = cache.store.shapes
    g = torch.randn(len(base), *shapes["g"][1:]).half()
    P = torch.randn(len(base), *shapes["P"][1:]).half()
    cache.write(np.array([1, 5]), g[[1, 5]], P[[1, 5]])
    cache.close()
    reader = train_features.RowReader(cache.folder)
    ds = train_features.CachedRowsDataset(base, reader)
    samples = [ds[i] for i in (5, 0, 1, 2)]
    assert ["image" in s for s in samples] == [False, True, False, True]
    batch = train_features.collate_cached(samples, reader)
    assert batch["index"].tolist() == [5, 0, 1, 2]
    assert batch["image_rows"].tolist() == [1, 3] and batch["cached_rows"].tolist() == [2, 0]  # file row order
    assert torch.equal(batch["g"], g[[1, 5]]) and torch.equal(batch["P"], P[[1, 5]])
    assert torch.equal(batch["image"], torch.stack([base[0]["image"], base[2]["image"]]))
    assert batch["img_id"] == [base.pairs[i]["img_id"] for i in (5, 0, 1, 2)]
    only_images = train_features.collate_cached([ds[0], ds[2]], reader)
    assert only_images["g"].numel() == 0 and only_images["cached_rows"].numel() == 0
    # the gathered rows in any order equal a row-by-row read
    order = [5, 1, 1, 5]
    g_got, P_got = reader.rows(order)
    assert torch.equal(g_got, g[order]) and torch.equal(P_got, P[order])


def test_worker_reads_train_like_main_process_reads(runs, data8, tiny_clip_path, tmp_path):
    root, _ = runs
    argv = args_for(data8, tiny_clip_path, tmp_path / "w", tmp_path / "cache", "--batch-size", 4, "--epochs", 2)
    train.main([*argv[:argv.index("--workers") + 1], "2", *argv[argv.index("--workers") + 2:]])
    assert [r["loss"] for r in read_log(tmp_path / "w")] == [r["loss"] for r in read_log(root / "cached")]
    want, got = state(root / "cached"), state(tmp_path / "w")
    assert all(torch.equal(want[k], got[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# staleness of the images, for training as for evaluation

def _same_size_and_time_other_bytes(path: Path) -> None:
    """Another image of the same size and modification time, written in place."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    assert data[6:11] == b"JFIF\x00"
    data[15] ^= 0x01  # the JFIF header's horizontal density: other bytes, the same pixels
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_training_cache_notices_an_image_replaced_in_place(tmp_path, capsys):
    data = make_pairs_data(tmp_path / "imagenet", n=4)
    image = data / "test" / "ILSVRC2012_test_00000002.JPEG"

    def fill(**kw) -> tuple[int, str]:
        capsys.readouterr()
        cache = _tiny_cache(tmp_path, data, **kw)
        before = cache.num_filled()
        cache.write(np.arange(4), torch.randn(4, 3), torch.randn(4, 2, 4))
        cache.close()
        return before, capsys.readouterr().out

    assert fill()[0] == 0 and fill()[0] == 4
    _same_size_and_time_other_bytes(image)
    assert fill()[0] == 4  # the default key (sizes and times) cannot see it
    assert fill(hash_contents=True)[0] == 0  # its own folder: keyed by contents
    assert fill(hash_contents=True)[0] == 4
    _same_size_and_time_other_bytes(image)  # flipped back: other bytes again
    before, out = fill(hash_contents=True)
    assert before == 0 and "not used (stale: made for other images_sha256); making a fresh one" in out
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched: a newer time
    before, out = fill()
    assert before == 0 and "not used (stale: made for other images_sha256)" in out
    assert len(folders(tmp_path / "c")) == 2  # replaced in place: one per way of keying the images


def test_gallery_store_rows_and_filled_mask(tmp_path, tiny_clip, capsys):
    root = small_circo(tmp_path / "CIRCO", [4, 8, 15, 16, 23, 42])
    ds = datasets.CIRCODataset(root, "val", "gallery", build_transform("targetpad", tiny_clip.image_size))
    cache = feature_store.EvalCache(tmp_path / "cache")
    key = cache.key(tiny_clip, ds, "fp32")
    feats = torch.randn(6, tiny_clip.embed_dim)
    assert cache.read_gallery(key) is None and cache.write_gallery(key, feats)
    (folder,) = folders(tmp_path / "cache")
    assert folder.name == feature_store.folder_name(key) and folder.name.startswith("circo-")
    on_disk = np.load(folder / "features.npy", mmap_mode="r")
    assert on_disk.dtype == np.float32 and np.array_equal(on_disk, feats.numpy())
    assert np.load(folder / "filled.npy").all()
    got = cache.read_gallery(key)
    assert torch.equal(got, feats) and "gallery cache: hit" in capsys.readouterr().out
    # a row not filled (an interrupted write, a hand-edited file): not used
    with open(folder / "filled.npy", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    assert cache.read_gallery(key) is None and "1 of 6 rows are missing" in capsys.readouterr().out
    # reference outputs: fp32 g and P in a store of their own beside the gallery's
    refs = ["42", "8"]
    outputs = feature_store.ReferenceOutputs(refs, torch.randn(2, 3), torch.randn(2, 5, 4))
    assert cache.write_references(key, outputs)
    back = cache.read_references(key, refs)
    assert back.names == refs and torch.equal(back.g, outputs.g) and torch.equal(back.P, outputs.P)
    assert back.P.dtype == torch.float32 and cache.read_references(key, ["8", "42"]) is None
    assert any(p.name.startswith("circo-refs-") for p in folders(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------
# disk space

def test_disk_shortage_is_one_line_before_the_first_step(data8, tiny_clip_path, tmp_path, monkeypatch):
    events = Events(monkeypatch)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**10))
    argv = args_for(data8, tiny_clip_path, tmp_path / "m", tmp_path / "cache", "--batch-size", 4, "--epochs", 1)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and f"--feature-cache-dir {tmp_path / 'cache'}" in msg
    # g [64] + P [17 x 128] fp16 of 8 images, the .npy headers and 8 flags
    assert re.search(r"needs 35\.\d KiB of disk for its 8 rows and .* has 10\.0 KiB free", msg), msg
    assert "drop --cache-image-features" in msg and "step" not in events.clear()
    assert not (tmp_path / "cache").exists()  # nothing left behind, not even the folder this start created
    monkeypatch.undo()

    # the space is there by the count, but reserving it fails: the same line
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(UserError, match=r"^--feature-cache-dir \S+: \S+ needs 568 bytes of disk for its 8 rows and \S+ "
                                         r"has [\d.]+ \w+ free; pass another --feature-cache-dir"):
        _tiny_cache(tmp_path, data8)
    assert not list((tmp_path / "c").iterdir())

    # a file system without fallocate: one line, the files sized all the same
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    logged = []
    monkeypatch.setattr(feature_store.log, "info", logged.append)
    cache = _tiny_cache(tmp_path, data8)
    assert sum("cannot reserve disk space" in line for line in logged) == 3  # g, P, filled
    assert open_arrays(cache.folder)[1].shape == (8, 2, 4)
    cache.write(np.array([3]), torch.ones(1, 3), torch.ones(1, 2, 4))
    cache.close()
    assert open_arrays(cache.folder)[2].sum() == 1


# ---------------------------------------------------------------------------------------------
# links and leftovers

def test_no_write_follows_a_link_the_store_did_not_make(tmp_path, data8):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "P.npy").write_bytes(b"precious")
    root = tmp_path / "c"
    cache = _tiny_cache(tmp_path, data8)
    name = cache.folder.name
    cache.close()
    shutil.rmtree(cache.folder)
    (root / name).symlink_to(victim, target_is_directory=True)  # a link where the store's folder goes
    cache = _tiny_cache(tmp_path, data8)
    assert not (root / name).is_symlink() and (root / name / "meta.json").is_file()
    assert sorted(os.listdir(victim)) == ["P.npy"] and (victim / "P.npy").read_bytes() == b"precious"
    cache.close()

    # a link in place of a data file: the folder is not used, and replaced without touching the target
    (root / name / "P.npy").unlink()
    (root / name / "P.npy").symlink_to(victim / "P.npy")
    assert feature_store.why_not_used(root / name, cache.store.key, {"P": None}) == "P.npy is a symbolic link"
    with pytest.raises(OSError) as e:  # an opened store writes through no link either
        feature_store.RowFiles(feature_store.FeatureStore(root / name, cache.store.key, {"P": None}, check=False))
    assert e.value.errno == errno.ELOOP
    cache = _tiny_cache(tmp_path, data8)
    cache.write(np.array([0]), torch.ones(1, 3), torch.ones(1, 2, 4))
    cache.close()
    assert not (root / name / "P.npy").is_symlink() and (victim / "P.npy").read_bytes() == b"precious"

    # the evaluation stores alike
    evc = feature_store.EvalCache(tmp_path / "eval")
    key = feature_store.store_key("gallery", FakeClip(), "t", "fp32", "float32", ["a", "b"], None, tmp_path, "g")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / feature_store.folder_name(key)).symlink_to(victim, target_is_directory=True)
    assert evc.read_gallery(key) is None and evc.write_gallery(key, torch.ones(2, 3))
    assert torch.equal(evc.read_gallery(key), torch.ones(2, 3)) and sorted(os.listdir(victim)) == ["P.npy"]


def test_temporaries_of_dead_processes_are_removed(tmp_path, data8):
    root = tmp_path / "c"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(dead.stdout)
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"  # this machine, as temporaries name it
    left = {f".train-0123.{host}.{dead}.0badc0de.tmp": "dir", f".x.{host}.{dead}.12345678.tmp": "file",
            f".train-0123.{host}.{os.getpid()}.deadbeef.tmp": "dir",  # this process: running
            f".train-0123.other-host.{dead}.0badc0de.tmp": "dir",  # another machine's: cannot be told
            "notes.tmp": "file"}
    for name, kind in left.items():
        (root / name).mkdir() if kind == "dir" else (root / name).write_text("x")
    (root / f".train-0123.{host}.{dead}.0badc0de.tmp" / "P.npy").write_text("half written")
    _tiny_cache(tmp_path, data8).close()
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))
    assert kept == sorted([f".train-0123.{host}.{os.getpid()}.deadbeef.tmp", f".train-0123.other-host.{dead}.0badc0de.tmp",
                           "notes.tmp"])


# ---------------------------------------------------------------------------------------------
# one store per node

# One of two processes that pretend to be two nodes of one process each (gloo, CPU). A plain script that
# imports only what it uses: a worker that imported this test module (train.py and all) would take many
# times longer to start.
NODE_WORKER = """
import json, os, sys, traceback
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
rank, data, dirs, out = int(os.environ["RANK"]), Path(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
result, code = {}, 0
try:
    import numpy as np
    import torch
    import torch.distributed as dist
    import train_features
    from datasets import ImageNetPairsDataset
    from distributed import init_distributed
    from errors import UserError
    from transforms import build_transform

    torch.set_num_threads(1)
    clip = SimpleNamespace(embed_dim=3, vision_width=4, fingerprint=lambda: {"source": "fake", "image_size": 32},
                           model=SimpleNamespace(visual=SimpleNamespace(positional_embedding=torch.zeros(2, 4))))
    info, _ = init_distributed("cpu")
    result["multi_node"] = info.multi_node
    ds = ImageNetPairsDataset(data, data / "pairs.json", build_transform("targetpad", 32))
    cache = train_features.open_feature_cache(dirs["shared"], clip, ds, "fp32", info)
    rows = np.arange(rank, 8, 2)  # this node's rows, its own values
    cache.write(rows, torch.full((4, 3), rank + 1.0), torch.full((4, 2, 4), rank + 1.0))
    cache.close()
    result["folder"] = str(cache.folder)
    try:  # node-local folders, node 1's unusable (a file in its place): every rank stops with one line
        train_features.open_feature_cache(dirs[f"local{rank}"], clip, ds, "fp32", info)
    except UserError as e:
        result["error"] = str(e)
    dist.barrier()
    dist.destroy_process_group()
except BaseException:
    traceback.print_exc()
    code = 1
finally:
    (out / f"{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo workers can abort at interpreter exit; skip it
"""


def test_one_store_per_node(data8, tmp_path):
    blocker = tmp_path / "node1_disk"
    blocker.write_text("not a folder")
    dirs = {"shared": str(tmp_path / "shared"), "local0": str(tmp_path / "node0_disk"), "local1": str(blocker)}
    port, src = free_port(), str(Path(__file__).resolve().parents[1] / "src")
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", NODE_WORKER, src, str(data8), json.dumps(dirs), str(tmp_path)],
                                      env=env))
    deadline = time.monotonic() + 300
    # until both are done, or one failed (the other would wait for it in a collective until gloo's timeout)
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    assert [p.wait() for p in procs] == [0, 0]
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert res[0]["multi_node"] and res[1]["multi_node"]
    node0, node1 = (Path(r["folder"]) for r in res)
    assert sorted(folders(tmp_path / "shared")) == [node0, node1]
    assert node0.name.endswith("-node0") and node1.name == node0.name[:-1] + "1"
    for k, folder in enumerate((node0, node1)):
        meta = json.loads((folder / "meta.json").read_text())
        assert folder.name == feature_store.folder_name(meta["key"]) + f"-node{k}"
        g, P, filled = open_arrays(folder)
        assert filled.nonzero()[0].tolist() == list(range(k, 8, 2))  # each node stored its own rows, in its own files
        assert (g[k::2] == k + 1).all() and (P[k::2] == k + 1).all() and not g[1 - k::2].any()
    # one error, the same on both ranks, naming node 1 and the fix
    assert res[0]["error"] == res[1]["error"]
    assert res[0]["error"].startswith(f"--feature-cache-dir {blocker}: node 1: ")
    assert "drop --cache-image-features" in res[0]["error"] and "\n" not in res[0]["error"]
    assert (tmp_path / "node0_disk").is_dir()  # node 0 made its own meanwhile
