"""Image preprocessing shared by every dataset and script (METHOD §9)."""
from __future__ import annotations

from PIL import Image
import torchvision.transforms.functional as TF
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_TYPES = ("targetpad", "clip")


class TargetPad:
    """Pad an elongated image with black, symmetrically, towards aspect ratio `target_ratio`.

    Images whose long/short side ratio is below the target are returned unchanged.
    """

    def __init__(self, target_ratio: float = 1.25):
        self.target_ratio = target_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.target_ratio:
            return image
        m = max(w, h) / self.target_ratio
        hp = max(int((m - w) / 2), 0)  # int() truncation as in the authors' code (code)
        vp = max(int((m - h) / 2), 0)
        return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")

    def __repr__(self) -> str:
        return f"TargetPad(target_ratio={self.target_ratio})"


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def build_transform(kind: str = "targetpad", size: int = 224, target_ratio: float = 1.25):
    """The image transform of METHOD §9.

    targetpad: pad -> bicubic resize of the short side -> centre crop -> RGB -> tensor -> CLIP
    normalisation, in this order (code). clip: CLIP's own preprocessing (the same without the pad).
    """
    if kind not in PREPROCESS_TYPES:
        raise ValueError(f"unknown preprocess type {kind!r}; choose one of {PREPROCESS_TYPES}")
    steps = [TargetPad(target_ratio)] if kind == "targetpad" else []
    steps += [
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        _to_rgb,  # RGB conversion after pad/resize/crop, as in the authors' code (code)
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ]
    return T.Compose(steps)
