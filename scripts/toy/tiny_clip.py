"""A tiny randomly initialised CLIP in OpenAI's layout, for the tests, the demo's toy CLIP and CPU benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

TINY_CLIP = dict(embed_dim=64, vision_width=128, vision_layers=2, patch_size=8, image_size=32, text_width=64, text_layers=2)


def build_tiny_clip(seed: int = 0, **overrides) -> CLIP:
    """A small randomly initialised CLIP with OpenAI's layout (vocabulary 49408, context 77, QuickGELU).

    Heads are width // 64, as OpenAI's loader infers them, so a state dict of this model loads back
    through `clip_loader.load_clip(weights=...)` with the architecture inferred.
    """
    c = {**TINY_CLIP, **overrides}
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=c["vision_layers"], width=c["vision_width"], patch_size=c["patch_size"], image_size=c["image_size"])
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=c["text_width"], heads=max(1, c["text_width"] // 64), layers=c["text_layers"])
    model = CLIP(c["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True)
    with torch.no_grad():  # open_clip's init leaves the projections small; make features less degenerate
        model.text_projection.normal_(0, c["text_width"] ** -0.5)
        model.visual.proj.normal_(0, c["vision_width"] ** -0.5)
    return model.eval()


def save_tiny_clip(path, seed: int = 0, **overrides) -> Path:
    """Writes a tiny CLIP as an OpenAI-format state dict file (what `--clip-weights` takes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = build_tiny_clip(seed, **overrides).state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, path)  # as OpenAI ships: fp16
    return path
