"""train.py --cache-image-features (src/train_cache.py) on CPU with a tiny random CLIP and generated JPEGs:
the stored rows, no image/visual pass for cached rows, numerics against the uncached path, stale and
foreign cache folders, mixed batches, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import train
import train_cache
import train_features
import training
from checkpoint import load_checkpoint
from clip_loader import FrozenCLIP
from test_train import make_pairs_data  # the same generated ImageNet layout as tests/test_train.py
from transforms import build_transform

LR = 4e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second OpenMP thread only spins on a 2-core box
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data8(tmp_path_factory) -> Path:
    return make_pairs_data(tmp_path_factory.mktemp("imagenet8"), n=8)


def args_for(data: Path, clip: Path, model_dir: Path, cache_dir: Path | None, *extra) -> list[str]:
    a = ["--imagenet-path", data, "--clip-weights", clip, "--model-dir", model_dir, "--device", "cpu",
         "--workers", 0, "--precision", "fp32", "--lr", LR, *extra]
    if cache_dir is not None:
        a += ["--cache-image-features", "--feature-cache-dir", cache_dir]
    return list(map(str, a))


def read_log(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]


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
    assert meta["preprocess_type"] == "targetpad" and meta["image_size"] == tiny_clip.image_size
    assert meta["num_images"] == 8 and meta["P_shape"] == list(P.shape)
    assert folder.name == train_cache.cache_key(meta)


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
    import shutil

    shutil.copytree(src, cache / src.name)  # a full cache for targetpad and the 8-image list
    g_before = np.array(np.load(cache / src.name / "g.npy"))
    events = Events(monkeypatch)
    capsys.readouterr()

    # another preprocessing
    train.main(args_for(data8, tiny_clip_path, tmp_path / "m1", cache, "--batch-size", 4, "--epochs", 1,
                        "--preprocess-type", "clip"))
    out = capsys.readouterr().out
    assert f"{cache / src.name} not used (made for other preprocess_type)" in out
    assert events.clear().count("load") == 8  # nothing came from the targetpad cache
    assert len(folders(cache)) == 2 and np.array_equal(np.load(cache / src.name / "g.npy"), g_before)

    # another image list (the first 4 pairs)
    pairs = json.loads((data8 / "pairs.json").read_text())[:4]
    (tmp_path / "pairs4.json").write_text(json.dumps(pairs))
    train.main(args_for(data8, tiny_clip_path, tmp_path / "m2", cache, "--batch-size", 4, "--epochs", 1,
                        "--pairs-path", tmp_path / "pairs4.json"))
    out = capsys.readouterr().out
    assert f"{cache / src.name} not used (made for other" in out and "names_sha256" in out
    assert events.clear().count("load") == 4 and len(folders(cache)) == 3

    # the right key's folder with a foreign meta.json (or one edited by hand): replaced, not trusted
    meta = json.loads((cache / src.name / "meta.json").read_text())
    meta["image_size"] = 999
    (cache / src.name / "meta.json").write_text(json.dumps(meta))
    train.main(args_for(data8, tiny_clip_path, tmp_path / "m3", cache, "--batch-size", 4, "--epochs", 1))
    out = capsys.readouterr().out
    assert f"{cache / src.name} is not usable (meta.json differs in image_size); making a fresh one" in out
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
    from test_train import _ddp_worker, _free_port

    common = ["--epochs", 2, "--mapper-dropout", 0]  # no dropout: per-rank dropout streams differ
    argv = args_for(data8, tiny_clip_path, tmp_path / "ddp", tmp_path / "cache_ddp", "--batch-size", 2, *common)
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
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

def _tiny_cache(tmp_path: Path, n: int = 6) -> train_cache.FeatureCache:
    meta = {"format_version": train_cache.FORMAT_VERSION, "num_images": n, "g_shape": [n, 3], "P_shape": [n, 2, 4]}
    return train_cache.FeatureCache(train_cache.prepare_cache(tmp_path / "c", meta), meta)


def test_queued_rows_are_stored_then_marked_filled(tmp_path, monkeypatch):
    cache = _tiny_cache(tmp_path)
    g, P = torch.randn(2, 3), torch.randn(2, 2, 4)
    order = []  # the data reaches the file before `filled` vouches for it
    for name in ("g", "P", "filled"):
        arr = getattr(cache, name)
        monkeypatch.setattr(cache, name, _Spy(arr, name, order))
    g0 = g.clone()
    cache.write(np.array([4, 1]), g, P)
    g[:] = 0  # the caller may reuse its tensors at once: write took its own copy
    cache.commit()
    assert order == ["g:set", "P:set", "g:flush", "P:flush", "filled:set", "filled:flush"]
    g_file, P_file, filled = open_arrays(cache.folder)
    assert filled.tolist() == [False, True, False, False, True, False]
    assert np.array_equal(g_file[[4, 1]], g0.half().numpy())
    assert np.array_equal(P_file[[4, 1]], P.half().numpy())
    cache.close()
    assert cache._thread is None


class _Spy:
    """A memory-mapped array that records item assignments and flushes."""

    def __init__(self, arr, name, log):
        self.arr, self.name, self.log = arr, name, log

    def __setitem__(self, key, value):
        self.log.append(f"{self.name}:set")
        self.arr[key] = value

    def flush(self):
        self.log.append(f"{self.name}:flush")
        self.arr.flush()


def test_writer_failure_is_raised_and_marks_nothing(tmp_path, monkeypatch):
    cache = _tiny_cache(tmp_path)
    cache.write(np.array([0]), torch.randn(1, 3), torch.randn(1, 2, 4))
    cache.commit()

    def disk_full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "_store", disk_full)
    cache.write(np.array([2]), torch.randn(1, 3), torch.randn(1, 2, 4))
    cache._queue.join()
    with pytest.raises(train_cache.FeatureCacheError, match=f"writing the feature cache {cache.folder} failed.*No space left"):
        cache.write(np.array([5]), torch.randn(1, 3), torch.randn(1, 2, 4))  # the next write reports it
    cache.write(np.array([2]), torch.randn(1, 3), torch.randn(1, 2, 4))
    with pytest.raises(train_cache.FeatureCacheError, match=f"writing the feature cache {cache.folder} failed.*No space left"):
        cache.commit()
    assert open_arrays(cache.folder)[2].tolist() == [True] + [False] * 5
    monkeypatch.undo()
    bad = torch.full((1, 3), float("inf"))
    cache.write(np.array([3]), bad, torch.zeros(1, 2, 4))
    with pytest.raises(train_cache.FeatureCacheError, match=r"training rows \[3\] are not finite"):
        cache.close()
    assert open_arrays(cache.folder)[2].sum() == 1


def test_cached_samples_and_collate(tmp_path, data8, tiny_clip):
    base = datasets.ImageNetPairsDataset(data8, data8 / "pairs.json", build_transform("targetpad", tiny_clip.image_size))
    meta = train_cache.cache_meta(tiny_clip, "targetpad", tiny_clip.image_size, base.names)
    cache = train_cache.FeatureCache(train_cache.prepare_cache(tmp_path / "c", meta), meta)
    g = torch.randn(len(base), *meta["g_shape"][1:]).half()
    P = torch.randn(len(base), *meta["P_shape"][1:]).half()
    cache.write(np.array([1, 5]), g[[1, 5]], P[[1, 5]])
    cache.close()
    reader = train_cache.CacheReader(cache.folder)
    ds = train_cache.CachedRowsDataset(base, reader)
    samples = [ds[i] for i in (5, 0, 1, 2)]
    assert ["image" in s for s in samples] == [False, True, False, True]
    batch = train_cache.collate_cached(samples, reader)
    assert batch["index"].tolist() == [5, 0, 1, 2]
    assert batch["image_rows"].tolist() == [1, 3] and batch["cached_rows"].tolist() == [2, 0]  # file row order
    assert torch.equal(batch["g"], g[[1, 5]]) and torch.equal(batch["P"], P[[1, 5]])
    assert torch.equal(batch["image"], torch.stack([base[0]["image"], base[2]["image"]]))
    assert batch["img_id"] == [base.pairs[i]["img_id"] for i in (5, 0, 1, 2)]
    only_images = train_cache.collate_cached([ds[0], ds[2]], reader)
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
