"""scripts/gpu_check.sh, the run a GPU node does, kept working between GPU runs: the whole check with
--cpu (about 270 CPU-seconds: 250-340 s on a 2-core CPU shared with other jobs), and its process
handling on its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpu_check

REPO = Path(__file__).resolve().parents[1]
# train_compile is CUDA-only here: inductor's CPU compile takes minutes on a small machine
# (tests/test_gpu_readiness.py trains with --compile on the CPU)
CUDA_ONLY = {"train_fp16", "torchrun", "tf32_new_api", "train_compile"}


def test_cpu_check_runs_every_path_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", "scripts/gpu_check.sh", "--cpu"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # gpu_check.py ends its children's process groups on SIGTERM
        stdout, _ = proc.communicate(timeout=60)
        pytest.fail("gpu_check.sh --cpu ran past 15 minutes:\n" + stdout[-3000:])
    assert proc.returncode == 0, stdout[-3000:]
    assert len(list(out.iterdir())) <= 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["cuda"] is None and summary["torch"]
    paths = summary["paths"]
    assert set(paths) == {"toy_world"} | {name for name, *_ in gpu_check.PATHS}
    for name, verdict in paths.items():
        assert verdict == "ok" or verdict.startswith("skipped: no CUDA"), f"{name}: {verdict}"
    assert {name for name, verdict in paths.items() if verdict.startswith("skipped")} == CUDA_ONLY
    # every figure is there (CPU figures of the tiny CLIP) but the compiled step's, measured on CUDA only
    assert set(summary["speed"]) == set(gpu_check.SPEED_KEYS)
    for key, value in summary["speed"].items():
        if key == "train_compile_images_per_s":
            assert value is None and any(n.startswith(key) for n in summary["notes"])
        else:
            assert isinstance(value, float) and value > 0, f"{key}: {value}"
    assert any(n.startswith("CPU run:") for n in summary["notes"])
    assert 0 < summary["seconds"] and set(summary["path_seconds"]) == set(paths)
    # each path's full output is logged, and its verdict printed as it ends
    log = (out / "paths.log").read_text()
    for name, verdict in paths.items():
        assert f"===== {name}: {verdict}" in log
        assert f"{name}: {verdict}" in stdout
    assert "[exit status 143," in log  # the signal path's first run, stopped cleanly
    assert "scripts/bench_eval.py" in (out / "speed.log").read_text()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_timeout_kills_the_whole_process_group(tmp_path):
    ctx = gpu_check.Ctx(False, tmp_path, time.time() + 60, dict(os.environ))
    pid_file = tmp_path / "child.pid"
    # a parent that starts a child which would outlive it, then both sleep
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\nprint('started', flush=True)\ntime.sleep(60)\n")
    t = time.time()
    with pytest.raises(gpu_check.Failed, match=r"timed out after \d+ s: started"):
        gpu_check.run(ctx, "sleeper", [sys.executable, "-c", code], timeout=3)
    assert time.time() - t < 30
    child = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.5)
    # killed with its parent's group: gone, or a zombie until init reaps it
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert "started" in ctx.logs["sleeper"][0] and not gpu_check.LIVE


def test_a_failing_path_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    def fails(ctx, name):
        gpu_check.run(ctx, name, [sys.executable, "-c", "import sys; print('working'); sys.exit('error: it broke')"], 30)

    def passes(ctx, name):
        gpu_check.run(ctx, name, [sys.executable, "-c", "print('fine')"], 30)

    def crashes(ctx, name):
        raise KeyError("a check of the script itself")

    monkeypatch.setattr(gpu_check, "PATHS", [
        ("first", fails, False, ()), ("second", passes, False, ()), ("third", crashes, False, ()),
        ("needs_first", passes, False, ("first",)), ("needs_second", passes, False, ("second",)),
        ("on_cuda", passes, True, ())])
    ctx = gpu_check.Ctx(False, tmp_path, time.time() + 60, dict(os.environ))
    verdicts = {}
    gpu_check.run_paths(ctx, 2, lambda name, verdict, seconds: verdicts.setdefault(name, verdict))
    assert verdicts == {"first": "error: it broke", "second": "ok", "third": "KeyError: 'a check of the script itself'",
                        "needs_first": "not run: first did not pass", "needs_second": "ok",
                        "on_cuda": "skipped: no CUDA"}
