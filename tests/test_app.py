"""src/app.py in a real browser: the app started on a free port over a generated gallery, headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright) uploads a reference image, types a text and
searches; the results, the pseudo-words of explain and the heat maps must appear. Skipped, with the
reason, only where gradio, playwright or the chromium binary is missing (.ci/run installs all three)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from checkpoint import load_network, save_network
from fti4cir_api import FTI4CIRModel
from models import FTI4CIR
from helpers import draw_gallery

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("FTI4CIR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TOP = 6


def _missing() -> str | None:
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (.venv/bin/pip install -r requirements-app.txt)"
    if not os.path.isfile(CHROMIUM):
        return f"no chromium binary at {CHROMIUM} (Debian: apt-get install chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the app did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def test_app_in_browser(tiny_clip, tiny_clip_path, tmp_path):
    missing = _missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    gallery = draw_gallery(tmp_path / "gallery", n=10, seed=1)
    torch.manual_seed(0)
    net_path = tmp_path / "fti4cir.pt"
    save_network(FTI4CIR.for_clip(tiny_clip), net_path)
    reference = gallery / "img04.png"
    text = "is red with long sleeves"

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, str(REPO / "src" / "app.py"), "--gallery", str(gallery), "--model-path", str(net_path),
           "--clip-weights", str(tiny_clip_path), "--device", "cpu", "--workers", "0", "--port", str(port),
           "--top", str(TOP), "--cache-dir", str(tmp_path / "cache")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # what the page must show, computed while the app starts: explain's words, from the same network
        model = FTI4CIRModel(load_network(net_path)[0], tiny_clip, workers=0, cache_dir=None, progress=False)
        want = model.explain(str(reference))
        _wait_for(url, proc, log)
        started = time.monotonic() - t0
        assert "10 images (encoded at start)" in log.read_text()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#reference input[type=file]").set_input_files(str(reference))
            page.locator("#query-text textarea").fill(text)
            page.locator("#baselines input[type=checkbox]").check()
            page.locator("#search").click()
            page.wait_for_function(f"document.querySelectorAll('#results img').length >= {TOP}", timeout=30000)
            page.wait_for_function(f"document.querySelectorAll('#text-only img').length >= {TOP}", timeout=30000)
            assert page.locator("#results img").count() == TOP
            assert page.locator("#image-only img").count() == TOP
            sentence = page.inner_text("#sentence")
            assert sentence.startswith(f"a photo of [{want.subject.word}] with") and sentence.endswith(f"but {text}")
            shown = sentence.split(" with ", 1)[1].rsplit(" but ", 1)[0].split()
            assert shown == [f"[{a.word}]" for a in want.attributes]
            words = page.inner_text("#words")
            assert f"r = {want.r} attribute words" in words and f"{want.attributes[0].score:.3f}" in words
            assert page.locator("#heatmaps img").count() == want.r
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"app up in {started:.1f} s, whole test {time.monotonic() - t0:.1f} s; screenshot {tmp_path / 'app.png'}")
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_app_without_gradio_says_how_to_install(monkeypatch, tmp_path):
    import app

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(SystemExit) as e:
        app.main(["--gallery", str(tmp_path), "--model-path", "x.pt"])
    assert str(e.value.code) == ("error: the app needs gradio, which is not installed; install it with: "
                                 ".venv/bin/pip install -r requirements-app.txt")
