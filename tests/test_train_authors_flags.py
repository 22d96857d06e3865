"""The authors' train.py flags that change nothing here (--optimizer, --pre_dataset, --save_training, --eps):
accepted in both spellings, each answered by one notice, none reaching the run's configuration; a training
set other than theirs stops with one line."""
from __future__ import annotations

import json

import pytest

import train
from cli import authors_train_notices
from helpers import train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tiny models run on one thread

AUTHORS = ["--optimizer", "adam", "--pre_dataset", "ImageNetDataset", "--save_training", "False", "--eps", "1e-8"]


def test_accepted_in_both_spellings_each_with_one_notice():
    for argv in (AUTHORS, ["--optimizer", "adam", "--pre-dataset", "ImageNetDataset", "--save-training", "False",
                           "--eps", "1e-8"]):
        args = train.build_parser().parse_args(argv)
        notices = authors_train_notices(args)
        assert [n.split(" ")[0] for n in notices] == ["--optimizer", "--pre-dataset", "--save-training", "--eps"]
        assert "AdamW" in notices[0] and "ImageNetDataset" in notices[1] and "--save-frequency" in notices[2]
        assert "1e-08" in notices[3] and "default eps 1e-8" in notices[3]
        assert not {"optimizer", "pre_dataset", "save_training", "eps"} & set(vars(args))
        default = train.build_parser().parse_args([])
        assert authors_train_notices(default) == []
        assert train.config_from_args(args) == train.config_from_args(default)


def test_another_training_set_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--pre_dataset", "CC3M", "--model-dir", str(tmp_path / "m")])
    assert str(e.value).startswith("error: --pre-dataset CC3M: the only training set is ImageNetDataset")
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()


def test_a_run_with_the_flags_prints_each_notice_once(data8, tiny_clip_path, tmp_path, capsys):
    model_dir = tmp_path / "run"
    train.main(train_args(data8, tiny_clip_path, model_dir, "--batch-size", 4, "--max-steps", 1, "--precision", "fp32",
                          *AUTHORS))
    out = capsys.readouterr().out
    for flag in ("--optimizer adam:", "--pre-dataset ImageNetDataset:", "--save-training False:", "--eps 1e-08:"):
        assert out.count(flag) == 1, flag
    hyper = json.loads((model_dir / "hyperparameters.json").read_text())
    assert not {"optimizer", "pre_dataset", "save_training", "eps"} & set(hyper)
    assert (model_dir / "checkpoints" / "latest.pt").is_file()
