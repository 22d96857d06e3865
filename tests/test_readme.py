"""The documentation stays true to the scripts: every flag a script takes is in the README (or, for the
benchmark scripts, in docs/PERFORMANCE.md), and every flag the documents name exists."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_SCRIPTS = ["src/train.py", "src/evaluate.py", "src/test.py", "src/caption.py", "scripts/demo.py",
                "scripts/make_toy_data.py", "scripts/make_toy_clip.py", "src/check_data.py", "src/retrieve.py"]
BENCH_SCRIPTS = ["scripts/bench.py", "scripts/bench_eval.py", "scripts/bench_feature_cache.py", "scripts/bench_metrics.py",
                 "scripts/bench_toy_clip.py", "scripts/gpu_check.py"]
# flags of other programs that the documents show in commands
OTHER_PROGRAMS = {"--nproc-per-node", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
                  "--index-url", "--no-deps", "--only-binary", "--python-version",
                  # sbatch / srun
                  "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--kill-on-bad-exit"}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][A-Za-z0-9_-]*")


def script_flags(path: str) -> set[str]:
    """The option strings a script's --help lists (its parser, aliases included)."""
    spec = importlib.util.spec_from_file_location(f"doc_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return set(FLAG.findall(out.getvalue())) - {"--help"}


def doc_flags(*names: str) -> set[str]:
    return set().union(*(FLAG.findall((REPO / n).read_text(encoding="utf-8")) for n in names))


@pytest.fixture(scope="module")
def flags() -> dict[str, set[str]]:
    return {p: script_flags(p) for p in USER_SCRIPTS + BENCH_SCRIPTS}


def test_every_script_flag_is_documented(flags):
    readme = doc_flags("README.md")
    for path in USER_SCRIPTS:
        kebab = {f for f in flags[path] if "_" not in f and not any(c.isupper() for c in f)}  # aliases may be left out
        assert kebab - readme == set(), f"{path}: flags missing from the README"
    perf = doc_flags("docs/PERFORMANCE.md")
    for path in BENCH_SCRIPTS:
        assert flags[path] - perf == set(), f"{path}: flags missing from docs/PERFORMANCE.md"


def test_every_documented_flag_exists(flags):
    known = set().union(*flags.values()) | OTHER_PROGRAMS
    known |= {f.replace("-", "_").replace("__", "--", 1) for f in known}  # the underscore spellings
    for doc in ("README.md", "docs/PERFORMANCE.md"):
        assert doc_flags(doc) - known == set(), f"{doc} names flags no script has"
