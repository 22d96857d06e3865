"""Image preprocessing shared by every dataset and script (METHOD §9).

Images enter the pipeline in the modes the authors' code was written for: RGB, RGBA and L (8-bit grey)
go in as they are, so their tensors are exactly the authors'. Every other mode is brought to 8 bits
first (`to_eight_bit`), because PIL's later conversion to RGB clips instead of scaling:
- 16-bit grey (I;16, I;16B, ...) and 32-bit integer grey (I, the mode PIL opens some 16-bit PNGs in) are
  scaled from the 16-bit range 0..65535 to 0..255 (I values outside that range are clipped), giving L;
- float grey (F) has no fixed range: it is scaled from its own minimum..maximum to 0..255 (a constant
  image gives black), giving L;
- every other mode (CMYK, palette P, LA, 1-bit, YCbCr, ...) is converted to RGB by PIL.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
import torchvision.transforms.functional as TF
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_TYPES = ("targetpad", "clip")


# the modes the authors' pipeline takes as they are
AS_STORED = ("RGB", "RGBA", "L")


def to_eight_bit(image: Image.Image) -> Image.Image:
    """`image` in one of AS_STORED (itself when it already is one), as the module docstring says."""
    if image.mode in AS_STORED:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        a = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
        return Image.fromarray(np.rint(a / 257.0).astype(np.uint8), "L")
    if image.mode == "F":
        a = np.asarray(image).astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.rint(np.nan_to_num(np.clip(scaled, 0, 255))).astype(np.uint8), "L")
    return image.convert("RGB")


class TargetPad:
    """Pad an elongated image with black, symmetrically, towards aspect ratio `target_ratio`.

    Images whose long/short side ratio is below the target are returned unchanged (modes other than
    RGB, RGBA and L are first brought to 8 bits, `to_eight_bit`).
    """

    def __init__(self, target_ratio: float = 1.25):
        self.target_ratio = target_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        image = to_eight_bit(image)
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
    Both first bring modes other than RGB, RGBA and L to 8 bits (`to_eight_bit`; TargetPad does it itself).
    """
    if kind not in PREPROCESS_TYPES:
        raise ValueError(f"unknown preprocess type {kind!r}; choose one of {PREPROCESS_TYPES}")
    steps = [TargetPad(target_ratio)] if kind == "targetpad" else [to_eight_bit]
    steps += [
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        _to_rgb,  # RGB conversion after pad/resize/crop, as in the authors' code (code)
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ]
    return T.Compose(steps)
