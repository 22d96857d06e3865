"""Numeric precision, one vocabulary for every script.

- `fp32`: plain float32. For inference it also pins full-precision matmuls (the authors' inference).
- `tf32`: float32 tensors, TF32 tensor-core matmuls and convolutions (CUDA only; inference).
- `bf16`, `fp16`: autocast to that type. Training in fp16 adds a gradient scaler (the authors').

Training takes `fp16` / `bf16` / `fp32` (`TRAIN_PRECISIONS`); evaluation takes all four; the caption
step uses the same names for the dtype BLIP's weights are cast to (`auto`: fp16 on CUDA, fp32 elsewhere).
"""
from __future__ import annotations

import contextlib

import torch

from errors import ConfigError, DeviceError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TRAIN_PRECISIONS = ("fp16", "bf16", "fp32")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str, device, allowed=PRECISIONS) -> None:
    """ConfigError for a name outside `allowed`, DeviceError for one `device` cannot run."""
    device = torch.device(device)
    if precision not in allowed:
        raise ConfigError(f"--precision {precision!r}: choose one of {tuple(allowed)}")
    if device.type == "cuda" and precision == "bf16" and torch.cuda.is_available() and not _native_bf16(device):
        raise DeviceError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 arithmetic (it needs an "
                          "Ampere or newer GPU); use --precision fp16 there")
    if device.type == "cuda" or precision == "fp32":
        return
    if device.type == "cpu" and precision == "bf16":
        return
    raise DeviceError(f"--precision {precision} is not available on {device.type}: "
                      f"use fp32{' or bf16' if device.type == 'cpu' else ''} there (fp16 and tf32 need CUDA)")


def _native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself (compute capability 8.0 and up), not by emulation."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def training_precision(precision: str, device) -> str:
    """The precision training runs in: fp16 needs CUDA, so on another device it falls back to fp32 (the
    caller says so)."""
    device = torch.device(device)
    if precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {TRAIN_PRECISIONS}")
    if precision == "fp16" and device.type != "cuda":
        return "fp32"
    check_precision(precision, device, TRAIN_PRECISIONS)
    return precision


def uses_grad_scaler(precision: str) -> bool:
    return precision == "fp16"


def autocast(precision: str, device):
    """The training step's region: autocast for fp16/bf16, nothing for fp32."""
    device = torch.device(device)
    if precision in ("fp16", "bf16"):
        return torch.autocast(device.type, dtype=DTYPES[precision])
    return contextlib.nullcontext()


# PyTorch has two ways to set TF32: the legacy `torch.set_float32_matmul_precision` / `cudnn.allow_tf32`,
# and per-backend `fp32_precision` attributes. Once anything in the process has used the per-backend
# ones (transformers' tf32=True does, launch scripts do), reading the legacy matmul setting raises, so
# where this torch has them they are the only ones read or written here.
_PER_BACKEND = hasattr(torch.backends, "fp32_precision") and hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _per_backend_settings() -> list[tuple[object, str]]:
    b = torch.backends
    return [(b.cuda.matmul, "fp32_precision"), (b.mkldnn.matmul, "fp32_precision"), (b.cudnn.conv, "fp32_precision")]


@contextlib.contextmanager
def float32_math(tf32: bool):
    """float32 matmuls in full precision (`tf32=False`) or on TF32 tensor cores, and cuDNN convolutions
    with TF32 allowed (PyTorch's default), for the region; the settings are restored after."""
    if _PER_BACKEND:
        settings = _per_backend_settings()
        saved = [getattr(obj, name) for obj, name in settings]
        matmul = "tf32" if tf32 else "ieee"
        for (obj, name), value in zip(settings, (matmul, matmul, "tf32")):
            setattr(obj, name, value)
        try:
            yield
        finally:
            for (obj, name), value in zip(settings, saved):
                setattr(obj, name, value)
        return
    old_matmul = torch.get_float32_matmul_precision()
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_matmul)
        torch.backends.cudnn.allow_tf32 = old_cudnn


@contextlib.contextmanager
def inference(precision: str, device):
    """The region of an evaluation forward pass at `precision`.

    fp32 and tf32 set the float32 matmul precision explicitly for the duration (and restore it
    after), so a caller that enabled TF32, by either of PyTorch's ways, cannot change what fp32 means;
    cuDNN keeps PyTorch's default (TF32 allowed for convolutions), which is also what the authors'
    fp32 runs used.
    """
    device = torch.device(device)
    check_precision(precision, device)
    if precision in ("bf16", "fp16"):
        with torch.autocast(device.type, dtype=DTYPES[precision]):
            yield
        return
    with float32_math(tf32=precision == "tf32"):
        with torch.autocast(device.type, enabled=False):  # float32 even inside a caller's autocast region
            yield


def weights_dtype(name: str, device) -> torch.dtype:
    """The dtype a model's weights are cast to (the caption step): `auto` is fp16 on CUDA (fp16 keeps 3
    more mantissa bits than bf16, so beam search stays closer to fp32) and fp32 elsewhere."""
    device = torch.device(device)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose auto or one of {tuple(DTYPES)}")
    return DTYPES[name]
