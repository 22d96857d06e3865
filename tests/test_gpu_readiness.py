"""What differs on GPU nodes, checked on the CPU: TF32 set through PyTorch's per-backend API before a
script runs, the device each process of a torchrun or srun job takes, and the process layout read
from either launcher."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import distributed
from distributed import DistInfo, layout_from_env, pick_device
from errors import ConfigError, DeviceError
from evaluate import main as evaluate_main
from test_evaluate import make_cirr

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fti4cir_test_script_gpu", REPO / "src" / "test.py")
test_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_script)


# ---------------------------------------------------------------------------------------------
# TF32 through the per-backend API

PER_BACKEND = [(torch.backends, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision"),
               (torch.backends.mkldnn.matmul, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision"),
               (torch.backends.cudnn.rnn, "fp32_precision"), (torch.backends.mkldnn.conv, "fp32_precision")]
SPELLINGS = ["torch.backends.fp32_precision", "torch.backends.cuda.matmul.fp32_precision",
             "torch.backends.cudnn.conv.fp32_precision"]


@pytest.fixture
def per_backend_restored():
    """Every per-backend setting is put back after the test, so the legacy API works again elsewhere."""
    saved = [getattr(obj, name) for obj, name in PER_BACKEND]
    yield
    for (obj, name), value in zip(PER_BACKEND, saved):
        setattr(obj, name, value)


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory) -> Path:
    return make_cirr(tmp_path_factory.mktemp("cirr") / "CIRR", np.random.default_rng(3))


def _evaluate_and_submit(cirr_root, net_path, tiny_clip_path, out: Path) -> tuple[dict, bytes, bytes]:
    args = ["--dataset", "cirr", "--cirr-path", str(cirr_root), "--model-path", str(net_path),
            "--clip-weights", str(tiny_clip_path), "--device", "cpu", "--batch-size", "8", "--workers", "0",
            "--no-progress", "--save-path", str(out), "--no-cache"]
    metrics = evaluate_main(args)
    test_script.main(args)
    return metrics, (out / "cirr" / "cirr.json").read_bytes(), (out / "cirr" / "subset_cirr.json").read_bytes()


@pytest.fixture(scope="module")
def plain_run(cirr_root, tiny_clip_path, tmp_path_factory):
    from checkpoint import save_network
    from clip_loader import load_clip
    from models import FTI4CIR

    torch.manual_seed(0)
    net_path = tmp_path_factory.mktemp("net") / "fti4cir.pt"
    save_network(FTI4CIR.for_clip(load_clip("ViT-L/14", tiny_clip_path, device="cpu")), net_path)
    return net_path, _evaluate_and_submit(cirr_root, net_path, tiny_clip_path, tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_tf32_set_per_backend_before_the_scripts(spelling, plain_run, cirr_root, tiny_clip_path, tmp_path,
                                                 per_backend_restored):
    """Launch scripts and transformers' tf32=True set TF32 this way; the legacy getter then raises."""
    net_path, plain = plain_run
    owner, _, attr = spelling.rpartition(".")
    setattr(eval(owner), attr, "tf32")  # noqa: S307 - one of the three spellings above
    if spelling != "torch.backends.cudnn.conv.fp32_precision":
        with pytest.raises(RuntimeError, match="legacy and new APIs"):  # what the scripts must not call
            torch.get_float32_matmul_precision()
    assert _evaluate_and_submit(cirr_root, net_path, tiny_clip_path, tmp_path) == plain
    assert getattr(eval(owner), attr) == "tf32"  # the caller's setting is left as it was


def test_inference_region_pins_full_precision_and_restores(per_backend_restored):
    from precision import inference

    torch.backends.fp32_precision = "tf32"
    with inference("fp32", "cpu"):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # PyTorch's default for convolutions
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    with inference("tf32", "cuda"):  # entering needs no GPU: only settings change
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "tf32"


# ---------------------------------------------------------------------------------------------
# the process layout and the device of each process

def test_layout_from_torchrun():
    env = {"WORLD_SIZE": "16", "RANK": "11", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1"}
    info = layout_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (11, 16, 3, 8, 1)
    assert info.multi_node and info.launcher == "torchrun"
    assert not layout_from_env({"WORLD_SIZE": "1"}).enabled


def test_layout_from_srun():
    env = {"SLURM_STEP_NUM_TASKS": "7", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4,3"}
    info = layout_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (5, 7, 1, 3, 1)
    assert info.launcher == "slurm" and info.multi_node
    assert layout_from_env({**env, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NUM_TASKS": "8"}).local_world_size == 4
    # a job script's own shell sees SLURM_* too, but is one process
    assert not layout_from_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}).enabled
    with pytest.raises(ConfigError, match="SLURM_STEP_TASKS_PER_NODE"):
        layout_from_env({**env, "SLURM_STEP_TASKS_PER_NODE": "four"})


def test_device_of_each_process(monkeypatch):
    cuda = torch.device("cuda")
    two = DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert pick_device(cuda, two, visible=8) == torch.device("cuda", 1)
    assert pick_device(cuda, two, visible=1) == torch.device("cuda", 0)  # one GPU shown per task (SLURM)
    assert pick_device(torch.device("cpu"), two, visible=0) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda:2: with 2 processes"):
        pick_device(torch.device("cuda:2"), two, visible=8)
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES=0,1,2"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
        pick_device(cuda, DistInfo(rank=3, world_size=4, local_rank=3, local_world_size=4), visible=3)
    assert pick_device(torch.device("cuda:3"), DistInfo(), visible=8) == torch.device("cuda", 3)


def test_main_only_reports_rank_zero_failure_to_every_rank(monkeypatch):
    """Rank 1's view: rank 0 failed; it raises at once instead of waiting at the next collective."""
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj, info: ["OSError: [Errno 28] No space left", None])
    with pytest.raises(distributed.RankFailed, match="rank 0 failed while saving.*No space left"):
        distributed.main_only(DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2), lambda: 1, "saving")
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj, info: [None, obj])
    calls = []
    assert distributed.main_only(DistInfo(rank=1, world_size=2), lambda: calls.append(1), "x") is None
    assert calls == []  # only rank 0 runs it


def test_main_only_single_process_reraises():
    with pytest.raises(OSError, match="disk"):
        distributed.main_only(DistInfo(), lambda: (_ for _ in ()).throw(OSError("disk")), "saving")
    assert distributed.main_only(DistInfo(), lambda: 7, "x") == 7
