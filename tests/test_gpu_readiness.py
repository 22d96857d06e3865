"""What differs on GPU nodes, checked on the CPU: TF32 set through PyTorch's per-backend API before a
script runs, the device each process of a torchrun or srun job takes, and the process layout read
from either launcher."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import distributed
from distributed import DistInfo, layout_from_env, pick_device
from errors import ConfigError, DeviceError
from evaluate import main as evaluate_main
from helpers import load_test_script, make_cirr, read_log

REPO = Path(__file__).resolve().parents[1]
test_script = load_test_script()


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


# ---------------------------------------------------------------------------------------------
# the loss matrices under bf16 autocast

def test_bf16_loss_matrices_in_float32():
    """Under bf16 autocast the similarity and Gram matrices are float32 products (autocast off for them);
    bf16 products would be off by about 1e-3."""
    from models import contrastive_loss, orthogonality_loss

    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(16, 32, generator=g).bfloat16(), torch.randn(16, 32, generator=g).bfloat16()
    A = torch.nn.functional.normalize(torch.randn(4, 12, 32, generator=g), dim=-1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        con, ortho = contrastive_loss(u, w, 0.2), orthogonality_loss(A)
    assert con.dtype == ortho.dtype == torch.float32
    want_con, want_ortho = contrastive_loss(u.float(), w.float(), 0.2), orthogonality_loss(A.float())
    torch.testing.assert_close(con, want_con, rtol=1e-6, atol=0)
    torch.testing.assert_close(ortho, want_ortho, rtol=1e-6, atol=0)
    # what the products give in bf16, for scale: far outside the tolerance above
    z = torch.cat([torch.nn.functional.normalize(u.float(), dim=-1), torch.nn.functional.normalize(w.float(), dim=-1)])
    bf16_sim = (z.bfloat16() @ z.bfloat16().T).float()
    assert (bf16_sim - z @ z.T).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# failure modes of a cluster job

def test_bf16_refused_on_a_gpu_without_it(monkeypatch):
    from precision import check_precision, training_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(DeviceError, match="Tesla V100-SXM2-32GB has no bf16 arithmetic.*--precision fp16"):
        training_precision("bf16", "cuda")
    with pytest.raises(DeviceError, match="no bf16"):
        check_precision("bf16", "cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert training_precision("bf16", "cuda") == "bf16"


def _train_args(data: Path, clip: Path, model_dir: Path, *extra) -> list[str]:
    return ["--imagenet-path", str(data), "--clip-weights", str(clip), "--model-dir", str(model_dir),
            "--device", "cpu", "--workers", "0", "--batch-size", "2", "--no-progress", *map(str, extra)]


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 autocast and the dynamic gradient scaler on the CPU, as train.py runs them on a GPU."""
    import precision

    monkeypatch.setattr(precision, "training_precision", lambda name, device: name)


@pytest.fixture
def nan_from_step(monkeypatch):
    """The contrastive loss is NaN from training step `first` (1-based) to `last`."""
    import models

    original, calls, span = models.contrastive_loss, [], {}

    def poisoned(u, w, t):
        calls.append(1)
        loss = original(u, w, t)
        return loss * float("nan") if span["first"] <= len(calls) <= span["last"] else loss

    monkeypatch.setattr(models, "contrastive_loss", poisoned)
    return lambda first, last=10**9: span.update(first=first, last=last)


def test_fp16_skips_an_overflowing_step_and_goes_on(fp16_on_cpu, nan_from_step, data8, tiny_clip_path, tmp_path, capsys):
    import train
    from checkpoint import load_checkpoint

    nan_from_step(3, 4)
    model_dir = tmp_path / "run"
    train.main(_train_args(data8, tiny_clip_path, model_dir, "--epochs", 2, "--max-steps", 6, "--precision", "fp16"))
    records = read_log(model_dir)
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5, 6]  # every step is logged, skipped or not
    assert records[2].get("skipped") and records[3].get("skipped")
    assert not records[4].get("skipped") and not records[5].get("skipped")  # the run went on
    out = capsys.readouterr().out
    assert "warning: global step 3: the fp16 loss or gradients overflowed; the update was skipped" in out
    state = load_checkpoint(model_dir / "checkpoints" / "latest.pt")
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert state["scaler"]["scale"] <= 2.0**14  # halved at each skipped step
    assert state["loss"] == records[5]["loss"]


def test_fp16_stops_after_a_run_of_skipped_steps(fp16_on_cpu, nan_from_step, data8, tiny_clip_path, tmp_path,
                                                  monkeypatch):
    import train
    import training

    monkeypatch.setattr(training, "MAX_SKIPPED_STEPS", 4)  # 20 on a real run
    nan_from_step(1)
    model_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(_train_args(data8, tiny_clip_path, model_dir, "--epochs", 2, "--precision", "fp16"))
    assert "non-finite loss at epoch 1, global step 4 (the 4th fp16 step in a row skipped)" in str(exc.value)
    assert len(read_log(model_dir)) == 3  # the last one raised before it was logged


def test_fp32_non_finite_step_changes_no_weight(nan_from_step, data8, tiny_clip_path, tmp_path, monkeypatch):
    """bf16 / fp32: the first non-finite step stops the run; the guard skipped its update on the device."""
    import train
    import training

    nan_from_step(2)
    seen = {}
    original = training.training_step

    def spy(run, batch):
        seen.setdefault("before", {k: v.clone() for k, v in run.net.state_dict().items()})
        try:
            return original(run, batch)
        except training.NonFiniteLossError:
            seen["after"] = run.net.state_dict()
            raise

    monkeypatch.setattr(training, "training_step", spy)
    with pytest.raises(SystemExit, match="non-finite loss at epoch 1, global step 2"):
        train.main(_train_args(data8, tiny_clip_path, tmp_path / "run", "--epochs", 1))
    changed = [k for k, v in seen["after"].items() if not torch.equal(v, seen["before"][k])]
    assert changed  # step 1 trained
    # step 2's NaN gradients reached no weight: every weight is finite
    assert all(torch.isfinite(v).all() for v in seen["after"].values())


def test_lock_on_a_file_system_without_locks(data8, tiny_clip_path, tmp_path, monkeypatch, capsys):
    import errno

    import run_folder
    import train

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(run_folder.fcntl, "flock", no_locks)
    result = train.main(_train_args(data8, tiny_clip_path, tmp_path / "run", "--epochs", 1))
    assert result["global_step"] == 4
    assert "cannot lock files (Function not implemented); training goes on" in capsys.readouterr().out


def test_a_bad_image_with_loader_workers_exits_at_once(data8, tiny_clip_path, tmp_path):
    """DataLoader workers ignore SIGTERM (a clean stop on pre-emption); an error must still end them."""
    import shutil
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    shutil.copytree(data8, data)
    image = data / "test" / "ILSVRC2012_test_00000003.JPEG"
    image.write_bytes(image.read_bytes()[:200])  # truncated
    argv = _train_args(data, tiny_clip_path, tmp_path / "run", "--epochs", 1)
    argv[argv.index("--workers") + 1] = "2"
    t = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *argv], capture_output=True, text=True,
                          timeout=400, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.monotonic() - t
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "ILSVRC2012_test_00000003.JPEG" in last, last
    assert elapsed < 200, elapsed  # without the shutdown it waits for the workers for good


# ---------------------------------------------------------------------------------------------
# a failure on rank 0 alone reaches every rank

def _failing_rank0_worker(rank: int, port: int, argv: list[str], out: str) -> None:
    import os
    import sys
    import traceback

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import train
    import training

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", "latest.pt")

    if rank == 0:
        training.save_network = full_disk
    code = 0
    try:
        train.main(argv)
    except SystemExit as e:
        Path(out, f"rank{rank}.txt").write_text(str(e.code))
        code = 1
    except BaseException:  # noqa: BLE001
        Path(out, f"rank{rank}.txt").write_text(traceback.format_exc())
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def test_rank0_checkpoint_failure_stops_every_rank(data8, tiny_clip_path, tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = _train_args(data8, tiny_clip_path, tmp_path / "run", "--epochs", 1, "--batch-size", 1,
                       "--save-every-steps", 2, "--dist-timeout-minutes", 5)
    t = time.monotonic()
    ctx = mp.start_processes(_failing_rank0_worker, args=(port, argv, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=240)
    assert time.monotonic() - t < 200  # not the process-group timeout
    assert [p.exitcode for p in ctx.processes] == [1, 1]
    assert "No space left on device" in (tmp_path / "rank0.txt").read_text()
    assert "rank 0 failed while writing" in (tmp_path / "rank1.txt").read_text()


# ---------------------------------------------------------------------------------------------
# speed options, each against the plain path

def test_compile_trains_and_its_first_loss_equals_the_plain_run(data8, tiny_clip_path, tmp_path):
    import train

    losses = {}
    for name, extra in (("plain", ()), ("compiled", ("--compile",))):
        train.main(_train_args(data8, tiny_clip_path, tmp_path / name, "--epochs", 1, "--max-steps", 2, *extra))
        losses[name] = [r["loss"] for r in read_log(tmp_path / name)]
    assert losses["compiled"] == pytest.approx(losses["plain"], abs=1e-5, rel=0)


def test_causal_text_attention_equals_the_masked_attention(tiny_clip_path):
    """The same computation: equal to 1e-12 in float64; in float32, features and their gradients within
    1e-5 of the largest value (the kernels round differently)."""
    from clip_loader import load_clip

    clip = load_clip("ViT-L/14", tiny_clip_path, device="cpu")
    ids = clip.tokenize(["a photo of a red dog with a hat", "two cats", "a big blue car on the grass near a tall tree"])
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        clip.model.to(dtype)
        x = clip.token_embedding(ids).detach().requires_grad_()
        out = {}
        for causal in (False, True):
            clip.use_causal_text_attention(causal)
            f = clip.encode_token_embeddings(x, ids.argmax(-1))
            out[causal] = (f, *torch.autograd.grad(f.square().sum(), x))
        for plain, fast in zip(out[False], out[True]):
            assert (fast - plain).abs().max() <= tol * plain.abs().max(), dtype


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_visual_weights_within_half_precision(tiny_clip_path, dtype, tol):
    """Under autocast the weights are cast to the half type at every call anyway; what differs on a CPU is
    where LayerNorm rounds (CUDA's autocast runs it in float32 either way). Tolerance: `tol` relative to the
    largest |P|, a few units of the half type's last place."""
    from clip_loader import load_clip

    plain, half = (load_clip("ViT-L/14", tiny_clip_path, device="cpu") for _ in range(2))
    loaded = {k: v.clone() for k, v in plain.model.visual.state_dict().items()}
    half.hold_visual_weights_in(dtype)
    assert half.visual_dtype == dtype and half.model.token_embedding.weight.dtype == torch.float32
    images = torch.randn(4, 3, plain.image_size, plain.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        (g0, P0), (g1, P1) = plain.encode_visual(images), half.encode_visual(images)
    assert (P1.float() - P0.float()).abs().max() <= tol * P0.float().abs().max()
    assert (g1.float() - g0.float()).abs().max() <= tol * g0.float().abs().max()
    with half.float32_weights():  # fp32 validation inside a half-weight run: exactly the loaded weights
        assert all(torch.equal(v, loaded[k]) for k, v in half.model.visual.state_dict().items())
    assert half.visual_dtype == dtype


def test_half_weights_refused_after_compile(tiny_clip_path):
    """The compiled visual pass keeps the weights' dtype it was traced with (on an H200, fp16 weights under a
    pass compiled for float32 ones read out of bounds): the order is refused, and apply_speed_options'
    order (half, then compile) is what train.py runs."""
    from clip_loader import load_clip
    from training import apply_speed_options

    clip = load_clip("ViT-L/14", tiny_clip_path, device="cpu")
    assert clip.train_visual == clip.encode_visual
    clip.compile_visual()  # lazy: nothing is traced before the first call
    with pytest.raises(RuntimeError, match="hold the weights first"):
        clip.hold_visual_weights_in(torch.bfloat16)
    assert clip.visual_dtype == torch.float32
    clip = load_clip("ViT-L/14", tiny_clip_path, device="cpu")
    apply_speed_options(clip, "bf16", compile_visual=True, half_visual=True, causal_text=True)
    assert clip.visual_dtype == torch.bfloat16 and clip.train_visual != clip.encode_visual and clip.causal_text


def test_fused_adamw_equals_plain_adamw():
    from training import make_optimizer

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=g), torch.randn(32, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(10)]
    out = {}
    for fused in (False, True):
        net = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in start])
        opt = make_optimizer(net, lr=4e-3, wd=0.01, fused=fused)
        assert opt.defaults["fused"] is (True if fused else None)
        for step in grads:
            for p, gr in zip(net, step):
                p.grad = gr.clone()
            opt.step()
        out[fused] = [p.detach().clone() for p in net]
    assert all(not torch.equal(a, s) for a, s in zip(out[False], start))  # they moved
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_every_speed_option_trains_in_bf16(data8, tiny_clip_path, tmp_path):
    """--clip-half, --causal-text-attention, --fused-adamw and --deterministic together, against the plain
    bf16 run: the first loss within bf16 rounding (2e-3 relative), both runs finite throughout."""
    import train

    losses = {}
    for name, extra in (("plain", ()), ("fast", ("--clip-half", "--causal-text-attention", "--fused-adamw",
                                                   "--deterministic"))):
        train.main(_train_args(data8, tiny_clip_path, tmp_path / name, "--epochs", 1, "--max-steps", 3,
                               "--precision", "bf16", *extra))
        losses[name] = [r["loss"] for r in read_log(tmp_path / name)]
    assert all(np.isfinite(losses["fast"]))
    assert losses["fast"][0] == pytest.approx(losses["plain"][0], rel=2e-3)
    with pytest.raises(SystemExit, match="--clip-half holds the frozen visual tower in the autocast type"):
        train.main(_train_args(data8, tiny_clip_path, tmp_path / "fp32", "--clip-half", "--precision", "fp32"))


@pytest.mark.parametrize("first, then", [((), ("--fused-adamw",)), (("--fused-adamw",), ())])
def test_fused_adamw_may_change_on_resume(first, then, data8, tiny_clip_path, tmp_path):
    """The optimizer state a checkpoint carries says how AdamW ran; the flag of the resumed run decides
    (the fp16/bf16/fp32 scaler hands a fused AdamW its scale, which the plain one refuses)."""
    import train
    from checkpoint import load_checkpoint

    model_dir = tmp_path / "run"
    args = _train_args(data8, tiny_clip_path, model_dir, "--epochs", 2, "--precision", "bf16")
    train.main(args + ["--epochs", "1", *first])
    train.main(args + ["--resume", "latest", *then])
    saved = load_checkpoint(model_dir / "checkpoints" / "epoch_2.pt")
    assert saved["optimizer"]["param_groups"][0]["fused"] is (True if then else None)
    assert saved["global_step"] == len(read_log(model_dir)) == 8  # 4 steps an epoch, both epochs trained
