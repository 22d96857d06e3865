"""torch.hub entry point of FTI4CIR:

    model = torch.hub.load("path/to/fti4cir", "fti4cir", source="local",
                           checkpoint="FTI4CIR_released.pt", clip_weights="ViT-L-14.pt")
    index = model.index("photos/")
    hits = model.search(index, reference="photos/dress.jpg", text="is red with long sleeves", top=5)
    model.explain("photos/dress.jpg")

The library lives in src/ as flat modules (datasets, models, utils, ...); this file puts src/ on
sys.path, the one place that does so, and refuses to load when a module of the same name from
elsewhere is already imported (it would be used in place of this repository's).
"""
import os
import sys

dependencies = ["torch", "torchvision", "open_clip", "PIL", "numpy", "tqdm", "huggingface_hub"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")


def _use_src() -> None:
    clashes = []
    for name in sorted(f[:-3] for f in os.listdir(_SRC) if f.endswith(".py")):
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None) if module is not None else None
        if module is not None and (where is None or os.path.dirname(os.path.abspath(where)) != _SRC):
            clashes.append(f"{name} ({where or 'built in'})")
    if clashes:
        raise ImportError("fti4cir's src/ has modules named like ones this process already imported: "
                          f"{', '.join(clashes)}; load fti4cir first, or in a fresh process")
    if _SRC not in sys.path:
        sys.path.insert(0, _SRC)


def fti4cir(checkpoint=None, clip_weights=None, **kwargs):
    """FTI4CIR over a frozen CLIP, with `index(folder)`, `search(index, reference, text, top)` and
    `explain(reference)` (src/fti4cir_api.py).

    checkpoint: the authors' released file or a checkpoint of this repository (src/train.py), a local path
    or hf-hub:OWNER/REPO/FILE. clip_weights: OpenAI's CLIP file (e.g. ~/.cache/clip/ViT-L-14.pt), an
    open_clip checkpoint, or hf-hub:OWNER/REPO/FILE; None: open_clip's cached 'openai' weights.
    Other keywords (device, clip_model, batch_size, workers, precision, cache_dir, ...): fti4cir_api.load.
    """
    _use_src()
    from fti4cir_api import load

    return load(checkpoint, clip_weights, **kwargs)
