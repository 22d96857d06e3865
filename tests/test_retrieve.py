"""retrieve.py / folder_search.py: a folder ranked exactly as evaluate.py ranks the same benchmark
gallery (reference kept, CIRCO; reference excluded, CIRR), the outputs, the cache on the second run,
the baselines, image listing and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics as M
from datasets import ImageFolderDataset, list_images
from evaluation import retrieve, submission_files
from examples import grid_size
from folder_search import search_folder
from retrieve import main as retrieve_main
from helpers import eval_config, make_circo, make_cirr


def test_folder_ranks_like_evaluate(fast_clip, tiny_clip, net, net_path, eval_args, tmp_path, encoded, capsys):
    root = make_circo(tmp_path / "CIRCO", np.random.default_rng(12))
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    r = retrieve(net, tiny_clip, "circo", root, eval_config())
    qs = r.queries[:3]
    refs = [str(folder / f"{int(q['reference_name']):012d}.jpg") for q in qs]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"reference": f, "text": q["relative_caption"]})
                                                for f, q in zip(refs[1:], qs[1:])) + "\n\n")
    save = tmp_path / "ret"
    argv = [a for a in eval_args if a != "--no-cache"] + ["--cache-dir", str(tmp_path / "cache"), "--save-path", str(save),
            "--model-path", str(net_path), "--gallery", str(folder), "--reference", refs[0], "--text",
            qs[0]["relative_caption"], "--queries", str(tmp_path / "q.jsonl"), "--top", "10"]
    before = encoded.gallery_images_encoded
    out = retrieve_main(argv)
    assert encoded.gallery_images_encoded - before == len(r.names)
    want = M.topk_indices(r.query_features[:3], r.gallery.features, 10)
    got = [[str(int(Path(x["file"]).stem)) for x in q["results"]] for q in out["queries"]]
    assert got == [[r.names[j] for j in row] for row in want.tolist()]
    sims = r.query_features[:3] @ r.gallery.features.T
    for i, q in enumerate(out["queries"]):
        assert [x["score"] for x in q["results"]] == pytest.approx(sims[i, want[i]].tolist(), abs=1e-5)
        assert (q["reference"], q["text"]) == (refs[i], qs[i]["relative_caption"])
    assert json.loads((save / "results.json").read_text()) == out and out["gallery_images"] == len(r.names)
    assert Image.open(save / "results.png").size == grid_size(3, 10)
    printed = capsys.readouterr().out
    assert f"query 3: {refs[2]}" in printed and str(folder / out["queries"][0]["results"][0]["file"]) in printed
    # the second run: the gallery from evaluate.py's cache, nothing encoded again
    before = encoded.gallery_images_encoded
    assert retrieve_main(argv)["queries"] == out["queries"]
    assert encoded.gallery_images_encoded == before


def test_excluded_reference_ranks_like_cirr(tiny_clip, net, tmp_path):
    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(13))
    r = retrieve(net, tiny_clip, "cirr", root, eval_config(split="test1"))
    sub = submission_files("cirr", r)["cirr.json"]
    qs = r.queries[:3]
    res = search_folder(net, tiny_clip, root / "test1", [(str(root / "test1" / f"{q['reference_name']}.png"),
                                                          q["relative_caption"]) for q in qs], eval_config(), top=50,
                        exclude_reference=True)
    assert [[Path(res.retrieval.names[j]).stem for j in row] for row in res.ranked.tolist()] == \
        [sub[str(q["pair_id"])] for q in qs]
    # image-only, reference kept: the reference itself comes first, at similarity 1
    img = search_folder(None, tiny_clip, root / "test1", [(str(root / "test1" / f"{qs[0]['reference_name']}.png"), "x")],
                        eval_config(baseline="image-only"), top=3)
    assert Path(img.retrieval.names[int(img.ranked[0, 0])]).stem == qs[0]["reference_name"]
    assert float(img.scores[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(img.scores[0, :-1] >= img.scores[0, 1:])


def test_list_images_and_errors(fast_clip, eval_args, net_path, tmp_path):
    for rel in ("b.PNG", "a/c.jpg", "a/d.jpeg", "a/.hidden.jpg", ".cache/e.png", "notes.txt", "z/y/w.webp"):
        path = tmp_path / "g" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("x")
        else:
            Image.new("RGB", (8, 8), (len(rel), 0, 0)).save(path, format="PNG")
    assert list_images(tmp_path / "g") == ["a/c.jpg", "a/d.jpeg", "b.PNG", "z/y/w.webp"]
    ds = ImageFolderDataset(tmp_path / "g", "gallery", lambda im: im)
    assert ds.gallery_paths == [tmp_path / "g" / n for n in ds.names] and ds.label == "imagefolder"

    def error(*more):
        with pytest.raises(SystemExit) as e:
            retrieve_main(eval_args + ["--model-path", str(net_path), *more])
        return str(e.value.code)

    gallery = ["--gallery", str(tmp_path / "g")]
    assert "1 --reference and 0 --text" in error(*gallery, "--reference", str(tmp_path / "g" / "b.PNG"))
    assert "no query" in error(*gallery)
    assert "no such file" in error(*gallery, "--reference", str(tmp_path / "nope.png"), "--text", "x")
    assert "no such folder" in error("--gallery", str(tmp_path / "nowhere"), "--reference", "x", "--text", "y")
    (tmp_path / "q.jsonl").write_text('{"reference": "a.png"}\n')
    assert "q.jsonl:1" in error(*gallery, "--queries", str(tmp_path / "q.jsonl"))
    for empty in ("", "\n  \n"):  # a file without a query is named, not taken for no --queries at all
        (tmp_path / "q.jsonl").write_text(empty)
        assert error(*gallery, "--queries", str(tmp_path / "q.jsonl")) == (
            f'error: --queries {tmp_path / "q.jsonl"} holds no query (one JSON object per line: '
            '{"reference": "<image file>", "text": "<modification>"})')
    # an unreadable gallery image: the error names the file and the flag that leaves such images out
    (tmp_path / "g" / "b.PNG").write_bytes(b"not a png")
    message = error(*gallery, "--reference", str(tmp_path / "g" / "a" / "c.jpg"), "--text", "x")
    assert message.startswith(f"error: {tmp_path / 'g' / 'b.PNG'}: cannot decode the image") and "\n" not in message
    assert "re-download it" in message and "--skip-bad-images" in message
