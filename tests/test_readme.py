"""The documentation stays true to the scripts: every flag a user script takes is documented (in the
README or docs/FLAGS.md; the demo's tools may use docs/DEMO.md, the benchmark scripts
docs/PERFORMANCE.md), every flag the documents name exists, and every repository file they name is
there."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# script -> the documents any of which may hold its flags
USER_DOCS = ("README.md", "docs/FLAGS.md")
DEMO_DOCS = USER_DOCS + ("docs/DEMO.md",)
SCRIPT_DOCS = {
    "src/train.py": USER_DOCS, "src/evaluate.py": USER_DOCS, "src/test.py": USER_DOCS, "src/caption.py": USER_DOCS,
    "src/check_data.py": USER_DOCS, "src/retrieve.py": USER_DOCS, "src/app.py": USER_DOCS,
    "src/reproduce.py": USER_DOCS,
    "scripts/demo.py": DEMO_DOCS, "scripts/make_toy_data.py": DEMO_DOCS, "scripts/make_toy_clip.py": DEMO_DOCS,
    "scripts/bench_toy_clip.py": ("docs/DEMO.md",),
    "scripts/bench.py": ("docs/PERFORMANCE.md",), "scripts/bench_flops.py": ("docs/PERFORMANCE.md",), "scripts/bench_eval.py": ("docs/PERFORMANCE.md",),
    "scripts/bench_feature_cache.py": ("docs/PERFORMANCE.md",), "scripts/bench_metrics.py": ("docs/PERFORMANCE.md",),
    "scripts/gpu_check.py": ("docs/PERFORMANCE.md",), "scripts/score_server_file.py": USER_DOCS,
}
# the user scripts' aliases (underscore and the authors' spellings) may be left out of the documents
ALIASES_OPTIONAL = {p for p, docs in SCRIPT_DOCS.items() if docs in (USER_DOCS, DEMO_DOCS)}
DOCUMENTS = ("README.md", "docs/FLAGS.md", "docs/DEMO.md", "docs/PERFORMANCE.md", "docs/METHOD.md")
# flags of other programs that the documents show in commands
OTHER_PROGRAMS = {"--nproc-per-node", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
                  "--index-url", "--no-deps", "--only-binary", "--python-version",
                  # the CIRCO owners' src/evaluation.py
                  "--data_path", "--predictions_file_path",
                  # sbatch / srun
                  "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--kill-on-bad-exit"}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][A-Za-z0-9_-]*")
# a repository path the documents name: src/x.py, scripts/x.sh, tests/x.py, docs/X.md (a link's target or code)
REPO_PATH = re.compile(r"(?<![\w./-])(?:src|scripts|tests|docs)/[\w./-]*\w")


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
    return {p: script_flags(p) for p in SCRIPT_DOCS}


def test_every_script_flag_is_documented(flags):
    for path, docs in SCRIPT_DOCS.items():
        required = flags[path]
        if path in ALIASES_OPTIONAL:
            required = {f for f in required if "_" not in f and not any(c.isupper() for c in f)}
        assert required - doc_flags(*docs) == set(), f"{path}: flags documented in none of {', '.join(docs)}"


def test_every_documented_flag_exists(flags):
    known = set().union(*flags.values()) | OTHER_PROGRAMS | {"--help"}
    known |= {f.replace("-", "_").replace("__", "--", 1) for f in known}  # the underscore spellings
    for doc in DOCUMENTS:
        assert doc_flags(doc) - known == set(), f"{doc} names flags no script has"


def test_every_named_repository_file_exists():
    for doc in DOCUMENTS:
        text = (REPO / doc).read_text(encoding="utf-8")
        base = (REPO / doc).parent
        named = {m.rstrip(".") for m in REPO_PATH.findall(text)}
        # a relative link inside docs/ (`DEMO.md`, `../README.md`) resolves from the document's folder
        links = set(re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", text))
        missing = {p for p in named if not (REPO / p).exists()} | {p for p in links if not (base / p).exists()}
        assert missing == set(), f"{doc} names files the repository lacks"
