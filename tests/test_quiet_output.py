"""What a run prints besides its results: progress bars only on a terminal (unless forced), the CLIP-name
notice once per process however often CLIP is loaded, skip reasons in the test command's output."""
from __future__ import annotations

import sys
from pathlib import Path

import clip_loader
import dataset_checks
from utils import PROGRESS_ENV, show_progress

REPO = Path(__file__).resolve().parents[1]


class _Terminal:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def test_progress_bars_need_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal(True))
    assert show_progress() and show_progress(True) and not show_progress(False)
    monkeypatch.setattr(sys, "stderr", _Terminal(False))
    assert not show_progress(True)
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert show_progress(True) and not show_progress(False)  # --no-progress still wins
    monkeypatch.setenv(PROGRESS_ENV, "0")
    monkeypatch.setattr(sys, "stderr", _Terminal(True))
    assert not show_progress(True)


def test_a_bar_drawn_only_where_shown(tmp_path, monkeypatch, capsys):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text("not an image")
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    dataset_checks.image_problems([str(f) for f in files], workers=1, progress=True, desc="scan")
    assert capsys.readouterr().err == ""  # pytest's capture is no terminal
    monkeypatch.setenv(PROGRESS_ENV, "1")
    dataset_checks.image_problems([str(f) for f in files], workers=1, progress=True, desc="scan")
    assert "scan" in capsys.readouterr().err


def test_the_clip_name_notice_once_per_process(tiny_clip_path, monkeypatch, capsys):
    monkeypatch.setattr(clip_loader, "_NOTICES_GIVEN", set())
    for _ in range(3):
        clip_loader.load_clip("ViT-L/14", tiny_clip_path, device="cpu")
    out = capsys.readouterr().out
    assert out.count("--clip-model ViT-L/14 is not used") == 1
    clip_loader.load_clip("ViT-B/32", tiny_clip_path, device="cpu")  # another notice: said once too
    assert capsys.readouterr().out.count("--clip-model ViT-B/32 is not used") == 1


def test_the_test_command_prints_skip_reasons():
    command = next(line for line in (REPO / "scripts" / "test.sh").read_text().splitlines() if "pytest" in line)
    assert " -rs " in command
