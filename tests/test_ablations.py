"""The paper's ablations (METHOD §14): train.py --no-attributes (the subject pseudo-word alone) and
--no-subject (the attribute pseudo-words alone). Each trains a few steps on the tiny CLIP, is recorded in
its checkpoint, holds only the parts it trains, composes with those alone (checked against the per-sample
sentences of scripts/toy/reference.py) and is evaluated by evaluate.py; the two together are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import train
from checkpoint import load_checkpoint, load_network
from evaluate import main as evaluate_main
from helpers import KEYS, dataset_args, make_cirr, train_args
from models import FTI4CIR, FTI4CIRConfig
from toy.reference import select_one, sentence_feature
from utils import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the tiny models run on one thread

LEFT_OUT = {"no-attributes": ("phi_a.", "attributes."), "no-subject": ("phi_s.",)}


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return make_cirr(tmp_path_factory.mktemp("cirr") / "CIRR", np.random.default_rng(31), n_images=24, n_queries=6)


@pytest.mark.parametrize("flag", ["--no-attributes", "--no-subject"])
def test_each_ablation_trains_is_recorded_and_evaluates(flag, data8, tiny_clip_path, tiny_clip, cirr_root, eval_args,
                                                        tmp_path, capsys):
    ablation = flag[2:]
    model_dir = tmp_path / "model"
    result = train.main(train_args(data8, tiny_clip_path, model_dir, flag, "--batch-size", 4, "--epochs", 1,
                                   "--lr", 1e-3))
    assert result["global_step"] == 2
    ckpt = load_checkpoint(result["last_checkpoint"])
    assert ckpt["config"]["ablation"] == ablation
    keys = list(ckpt["state_dict"])
    assert not [k for k in keys if k.startswith(LEFT_OUT[ablation])]
    assert [k for k in keys if k.startswith("phi_s." if ablation == "no-attributes" else "phi_a.")]
    full = FTI4CIR.for_clip(tiny_clip).state_dict()
    assert set(keys) == {k for k in full if not k.startswith(LEFT_OUT[ablation])}
    # trained: the mappers it holds moved away from a fresh network of the run's seed
    seed_everything(42)
    fresh = FTI4CIR.for_clip(tiny_clip, ablation=ablation).state_dict()
    assert all(not torch.equal(fresh[k], ckpt["state_dict"][k]) for k in keys if k.startswith("phi_") and "weight" in k)
    capsys.readouterr()
    metrics = evaluate_main(dataset_args(eval_args, "cirr", cirr_root, "--model-path", str(result["last_checkpoint"])))
    assert list(metrics) == KEYS["cirr"] and all(0 <= v <= 100 for v in metrics.values())
    assert f"ablation {ablation}" in capsys.readouterr().out  # the log says what was loaded


def test_the_two_flags_together_are_refused(data8, tiny_clip_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data8, tiny_clip_path, tmp_path / "m", "--no-attributes", "--no-subject"))
    assert str(e.value).startswith("error: argument --no-subject: not allowed with argument --no-attributes")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="unknown ablation"):
        FTI4CIR(FTI4CIRConfig(embed_dim=64, vision_width=128, text_width=64, ablation="no-words"))


def test_the_full_method_is_unchanged_in_its_checkpoint(tiny_clip):
    cfg = FTI4CIR.for_clip(tiny_clip).cfg
    assert "ablation" not in cfg.to_dict()  # the full method's checkpoints hold the keys they always held
    assert FTI4CIRConfig.from_dict(cfg.to_dict()).ablation is None


@pytest.mark.parametrize("ablation", ["no-attributes", "no-subject"])
def test_composition_uses_only_the_trained_parts(ablation, tiny_clip, data8):
    """The composed query of each ablation equals the per-sample sentence METHOD §14 defines."""
    from PIL import Image

    from transforms import build_transform

    torch.manual_seed(3)
    net = FTI4CIR.for_clip(tiny_clip, ablation=ablation).eval()
    preprocess = build_transform("targetpad", tiny_clip.image_size)
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in sorted((data8 / "test").iterdir())[:3]])
    texts = [["is red"], ["has two dogs"], ["is * bigger"]]
    with torch.no_grad():
        g, P = tiny_clip.encode_visual(images)
        got = net.compose(tiny_clip, g, P, texts)[:, 0]
        for b, (text,) in enumerate(texts):
            if ablation == "no-attributes":
                want = sentence_feature(tiny_clip, "a photo of * with but " + text, net.phi_s(g[b]))
            else:
                A_sel, r, _ = select_one(net.attributes(P[b:b + 1])[0], g[b], net.cfg.topk, net.cfg.epsilon)
                want = sentence_feature(tiny_clip, "a photo of * with " + "* " * r + "but " + text,
                                        attrs=net.phi_a(A_sel)[:r])
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)
    # the training loss: no attribute transformer, so no orthogonality term, without the attributes
    texts = tiny_clip.prompts.training_texts(["dog", "cat", "car"], ["red", "small", "fast"])
    out = net.train()(tiny_clip, g, P, texts)
    assert torch.isfinite(out["total"])
    if ablation == "no-attributes":
        assert float(out["ortho"]) == 0.0 and float(out["num_attributes"]) == 0.0
    else:
        assert float(out["ortho"]) > 0.0


def test_load_network_rebuilds_the_ablation(tiny_clip, tmp_path):
    from checkpoint import save_network

    net = FTI4CIR.for_clip(tiny_clip, ablation="no-subject")
    save_network(net, tmp_path / "n.pt")
    loaded = load_network(tmp_path / "n.pt", "cpu")[0]
    assert loaded.cfg.ablation == "no-subject" and loaded.phi_s is None and loaded.phi_a is not None
