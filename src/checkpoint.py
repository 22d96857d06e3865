"""FTI4CIR checkpoints: this repository's format, the authors' released file, and the pieces of a
training checkpoint besides the weights (every process's random-number state, linking files).

This repo's format is a plain dict, loadable with `torch.load(weights_only=True)`:
`{"format": "fti4cir", "format_version": 1, "config": {...FTI4CIRConfig...}, "state_dict": {...}}`;
training checkpoints add `optimizer`, `scaler`, `epoch`, `step`, `rng` and `hparams` beside them, and what
the run was trained over: `clip_fingerprint` (FrozenCLIP.weights_fingerprint) and `data` (the pairs file's
digest and image count, train_config.data_fingerprint). Files without these two (the authors' released
file, or one written without them) still load; there is then nothing to compare.

The authors' file is a whole pickled module (class `i2t_model.IMG2TEXT`). It is read without their
code by a restricted unpickler that maps exactly their classes to empty stand-ins, allows the handful
of torch classes such a module is made of, and refuses anything else; its weights are then mapped to
this repo's names explicitly, with shape checks.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from errors import ConfigError, UserError, naming_written_file, torch_load_problem
from hub import local_file
from logs import get_logger
from models import FTI4CIR, FTI4CIRConfig
from utils import atomic_torch_save, temp_path

FORMAT = "fti4cir"
FORMAT_VERSION = 1

log = get_logger("checkpoint")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""


# ---------------------------------------------------------------------------------------------
# this repository's format

def network_payload(net: FTI4CIR) -> dict:
    net = getattr(net, "module", net)  # unwrap DDP
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": net.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def save_network(net: FTI4CIR, path, **extra) -> None:
    """Atomically writes the network (and any training state in `extra`); a failed write (a full disk) is an
    OSError naming `path`."""
    with naming_written_file(path):
        atomic_torch_save({**network_payload(net), **extra}, path)


def build_network(config: dict, state_dict: dict, source) -> FTI4CIR:
    try:
        cfg = FTI4CIRConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad FTI4CIR config: {e}") from e
    net = FTI4CIR(cfg)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit the FTI4CIR network (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)} for config {cfg}")
    net.load_state_dict(state_dict)
    return net


def not_a_file(path: Path) -> str:
    """Why `path`, which is no file, cannot be a checkpoint, in a few words."""
    return "is a folder, not a checkpoint file" if path.is_dir() else "no such file"


def require_model_file(path: Path) -> Path:
    """`path` itself when it is a file; a CheckpointError saying what to pass otherwise."""
    if not path.is_file():
        raise CheckpointError(f"--model-path {path}: {not_a_file(path)}; pass a checkpoint written by src/train.py "
                              "(model_dir/checkpoints/epoch_N.pt) or the authors' released model file")
    return path


def load_checkpoint(path) -> dict:
    """The raw dict of a checkpoint in this repo's format (training state included), checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--model-path {path}: {not_a_file(path)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: {torch_load_problem(e, path)}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an FTI4CIR checkpoint (no 'format': 'fti4cir' entry)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {obj.get('format_version')}, this code reads {FORMAT_VERSION}")
    return obj


def load_network(path, device: str | torch.device = "cpu") -> tuple[FTI4CIR, dict]:
    """Loads this repo's checkpoint or the authors' released one. Returns (network in eval mode, info).

    info: `{"format": "fti4cir" | "authors", "config": {...}}` plus, when the file holds them, `epoch`,
    `global_step`, `clip_fingerprint` and `clip_source` (the CLIP it was trained over).
    """
    path = require_model_file(Path(path))
    if is_authors_checkpoint(path):
        config, state_dict = read_authors_checkpoint(path)
        net = build_network(config, state_dict, path)
        info = {"format": "authors", "config": config}
    else:
        obj = load_checkpoint(path)
        net = build_network(obj["config"], obj["state_dict"], path)
        info = {"format": FORMAT, "config": obj["config"],
                **{k: obj[k] for k in ("epoch", "global_step", "clip_fingerprint") if k in obj}}
        hparams = obj.get("hparams")
        if isinstance(hparams, dict) and "clip_source" in hparams:
            info["clip_source"] = hparams["clip_source"]
    return net.to(device).eval(), info


def model_file(model_path: str | None) -> Path:
    """The local file of --model-path (an hf-hub: reference from the cache, else downloaded), checked to be
    given and a file; cheap, so the scripts call it before anything loads."""
    if not model_path:
        raise ConfigError("--model-path is required (an FTI4CIR checkpoint), unless --baseline "
                          "image-only|text-only is given")
    return require_model_file(Path(local_file(model_path, "--model-path")))


def load_model(model_path: str | None, clip, device: str | torch.device = "cpu",
               baseline: str | None = None) -> FTI4CIR | None:
    """The network of `model_path` (--model-path: a file or an hf-hub: reference) in eval mode on `device`,
    checked against `clip`; None for a `baseline` (image-only / text-only), which needs no network.

    A checkpoint that records the CLIP it was trained over (`clip_fingerprint`) is compared with `clip`:
    other weights give one warning line (the shapes fit, the results are not the trained network's). The
    network's attribute `loaded_from` holds the record `loaded_from()` makes, which evaluate.py writes."""
    if baseline is not None:
        if model_path:
            log.info(f"--baseline {baseline}: --model-path {model_path} is not used")
        return None
    path = model_file(model_path)
    net, info = load_network(path, device)
    try:
        net.check_clip(clip)
    except ValueError as e:
        raise ConfigError(f"--model-path {model_path} does not fit the CLIP loaded ({clip.source}): {e}. "
                          f"Pass the --clip-model/--clip-weights it was trained with") from e
    net.loaded_from = loaded_from(model_path, path, info, clip)
    extra = "".join(f", {k.replace('_', ' ')} {info[k]}" for k in ("epoch", "global_step") if k in info)
    if net.cfg.ablation:  # trained without one kind of pseudo-word: it composes without it too
        extra += f", ablation {net.cfg.ablation}"
    if "clip_fingerprint" not in info:  # the authors' file, or one written without it
        extra += "; its CLIP is not recorded, so not checked"
    where = f" = {path}" if str(path) != str(model_path) else ""
    log.info(f"model: {model_path}{where} ({info['format']} format{extra})")
    warn_if_other_clip(f"--model-path {model_path}", info, clip, "--clip-weights / --clip-model")
    return net


def warn_if_other_clip(what: str, info: dict, clip, fix: str) -> None:
    """One warning line when the checkpoint records a CLIP (`clip_fingerprint`) other than `clip`: the shapes
    fit, the results are not the trained network's."""
    recorded, current = info.get("clip_fingerprint"), clip.weights_fingerprint()
    if recorded is not None and recorded != current:
        log.warning(f"{what} was trained over other CLIP weights (fingerprint {recorded}, "
                    f"{info.get('clip_source', 'source not recorded')}) than the ones loaded (fingerprint {current}, "
                    f"{clip.source}): its results are not those of the trained model; pass the {fix} it was trained with")


def loaded_from(model_path, path: Path, info: dict, clip) -> dict:
    """What an evaluation used: the checkpoint (as given and as read), its format, epoch and global step
    (None when not recorded) and the fingerprints of the CLIP it was trained over (None when not
    recorded) and of the CLIP loaded."""
    return {"model_path": str(model_path), "file": str(path), "format": info["format"],
            "epoch": info.get("epoch"), "global_step": info.get("global_step"),
            "clip_fingerprint": {"checkpoint": info.get("clip_fingerprint"), "loaded": clip.weights_fingerprint()},
            "clip_source": {"checkpoint": info.get("clip_source"), "loaded": str(clip.source)}}


# ---------------------------------------------------------------------------------------------
# training state besides the weights

def capture_rng(device: torch.device) -> dict:
    """This process's random streams (torch, Python, NumPy, CUDA), as plain lists and tensors so that a
    checkpoint holding them still loads with weights_only=True."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """Puts back what capture_rng took."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if torch.device(device).type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_summaries(folder) -> list[dict]:
    """{path, epoch, global_step, loss} of every training checkpoint in `folder`, newest first (by global
    step). Read memory-mapped: only the small header is loaded, not the weights."""
    out = []
    for path in Path(folder).glob("*.pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - listed with what is wrong with it
            out.append({"path": path, "problem": torch_load_problem(e), "global_step": -1})
            continue
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            loss = obj.get("loss")
            out.append({"path": path, "epoch": obj.get("epoch"), "global_step": obj.get("global_step", -1),
                        "loss": float(loss) if isinstance(loss, (int, float)) else None})
    return sorted(out, key=lambda s: (s["global_step"], s["path"].name != "latest.pt"), reverse=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same file as src, atomically (a hard link, else a copy), without a second torch.save."""
    tmp = temp_path(dst)  # a fresh name: nothing there to follow
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------
# the authors' released checkpoint

class _StandIn(nn.Module):
    """Empty module standing in for one of the authors' classes while unpickling."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("stand-in for the authors' class; only its weights are used")


_AUTHOR_CLASSES = {
    ("i2t_model", "IMG2TEXT"), ("i2t_model", "Phi"),
    ("MHTransformer", "Transformer"), ("MHTransformer", "TransformerLayer"),
    ("MHTransformer", "MultiHeadAttention"), ("MHTransformer", "MlpTransformer"),
}
_STAND_INS = {key: type(key[1], (_StandIn,), {"__module__": f"fti4cir_standin.{key[0]}"}) for key in _AUTHOR_CLASSES}
_TORCH_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.modules.linear", "Linear"), ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.container", "ModuleList"), ("torch.nn.modules.activation", "GELU"),
    ("torch.nn.modules.activation", "Sigmoid"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.dropout", "Dropout"), ("torch.nn.modules.normalization", "LayerNorm"),
    ("torch.nn.modules.loss", "CosineEmbeddingLoss"), ("torch.nn.modules.loss", "MSELoss"),
    ("torch.nn.functional", "relu"), ("torch", "float32"), ("torch", "float16"), ("torch", "device"),
    ("torch", "Size"), ("builtins", "set"), ("__builtin__", "set"),  # protocol-2 pickles name builtins so
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
        if (module, name) in _TORCH_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the authors' FTI4CIR checkpoint")


_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=pickle.load, __name__="fti4cir_restricted_pickle")


def is_authors_checkpoint(path: Path) -> bool:
    """True when the file's pickle names the authors' `i2t_model` module (read from the archive, not executed)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("data.pkl")]
        return bool(names) and b"i2t_model" in z.read(names[0])


def _authors_key_map(layers: int) -> dict[str, str]:
    """authors' state-dict key -> this repo's key (templates handled separately: [1, K, W] -> [K, W])."""
    m = {}
    for phi in ("phi_s", "phi_a"):
        for i in (0, 3, 6):
            for p in ("weight", "bias"):
                m[f"{phi}.layers.{i}.{p}"] = f"{phi}.layers.{i}.{p}"
    for p in ("weight", "bias"):
        m[f"local_atte_fc.0.{p}"] = f"attributes.head.{p}"
    for i in range(layers):
        a, b = f"transformer.layers.{i}", f"attributes.layers.{i}"
        for p in ("weight", "bias"):
            m[f"{a}.norm1.{p}"] = f"{b}.norm1.{p}"
            m[f"{a}.norm2.{p}"] = f"{b}.norm2.{p}"
            m[f"{a}.attn.project.{p}"] = f"{b}.attn.out_proj.{p}"
            m[f"{a}.mlp.fc1.{p}"] = f"{b}.fc1.{p}"
            m[f"{a}.mlp.fc2.{p}"] = f"{b}.fc2.{p}"
        m[f"{a}.attn.to_queries.weight"] = f"{b}.attn.q_proj.weight"
        m[f"{a}.attn.to_keys_values.weight"] = f"{b}.attn.kv_proj.weight"
    return m


def read_authors_checkpoint(path) -> tuple[dict, dict]:
    """(config dict, state dict in this repo's names) from the authors' pickled `IMG2TEXT` module."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as e:
        if "refusing to load" in str(e):
            raise CheckpointError(f"{path}: {e}; it is not loaded") from None
        raise CheckpointError(f"{path}: {torch_load_problem(e, path)}") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: the authors' checkpoint is {torch_load_problem(e, path)}") from None
    if not isinstance(obj, _STAND_INS[("i2t_model", "IMG2TEXT")]):
        raise CheckpointError(f"{path}: expected a pickled i2t_model.IMG2TEXT module, found {type(obj).__name__}")
    sd = obj.state_dict()
    try:
        templates = sd["templates"]
        layers = len(obj.transformer.layers)
        attn = obj.transformer.layers[0].attn
        heads = int(getattr(attn, "num_heads", getattr(attn, "n_heads", 1)))
        fc1 = sd["transformer.layers.0.mlp.fc1.weight"]
        phi_in = sd["phi_s.layers.0.weight"]
        out = sd["local_atte_fc.0.weight"]
        config = {
            "embed_dim": int(phi_in.shape[1]), "vision_width": int(templates.shape[-1]), "text_width": int(out.shape[0]),
            "num_k": int(templates.shape[-2]), "topk": int(obj.topk), "epsilon": float(obj.epsilon),
            "temperature": float(obj.temperature), "reg_weight": float(obj.hy_regLoss),
            "tf_layer": layers, "tf_head": heads, "mlp_ratio": fc1.shape[0] / fc1.shape[1],
            # the file does not name its CLIP: only the visual width is known
            "clip_model": {1024: "ViT-L-14 or ViT-L-14-336", 768: "ViT-B-32 or ViT-B-16"}.get(
                int(templates.shape[-1]), f"a ViT of visual width {int(templates.shape[-1])}"),
        }
    except (KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: an IMG2TEXT module without the expected parts ({e})") from e
    if int(obj.num_k) != config["num_k"]:
        raise CheckpointError(f"{path}: num_k {obj.num_k} but templates hold {config['num_k']}")
    key_map = _authors_key_map(layers)
    unknown = sorted(set(sd) - set(key_map) - {"templates", "criterion_target"})
    if unknown:
        raise CheckpointError(f"{path}: unexpected weights in the authors' checkpoint: {unknown[:5]}")
    state_dict = {"attributes.templates": templates.reshape(templates.shape[-2], templates.shape[-1])}
    for theirs, ours in key_map.items():
        if theirs not in sd:
            raise CheckpointError(f"{path}: the authors' checkpoint lacks {theirs}")
        state_dict[ours] = sd[theirs]
    return config, state_dict  # shapes are checked against the rebuilt network by build_network
