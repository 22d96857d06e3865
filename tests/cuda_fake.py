"""Fake `cuda:0` tensors on a CPU-only machine, and a spy on what a CUDA run would do with them.

`fake_cuda(monkeypatch)` enters PyTorch's FakeTensorMode with CUDA's autocast rules switched on:
tensors carry a device, a dtype and a shape but no data, every operator runs its shape and dtype
rules only, and `torch.autocast("cuda", ...)` casts exactly as on a GPU. An operator that mixes a
CPU tensor (other than a 0-dim scalar) with a cuda tensor raises, as on a GPU. Nothing can read a
value back (`.item()`, `.tolist()`, `bool(t)`, `int(t)`), and nothing can run backward.

`CudaSpy`, entered inside that mode, sees every operator after autocast and records:
- `copies`: host-to-device copies that block the host. A copy blocks unless it is asked for with
  `non_blocking=True` *and* its source is pinned memory; that covers `Tensor.to`, `Tensor.cuda`,
  `torch.tensor(..., device=cuda)`, `torch.as_tensor(..., device=cuda)`, `copy_` and an operator
  that takes a CPU index into a cuda tensor (all of them reach `aten._to_copy` / `aten.copy_`, or
  carry the CPU tensor into a cuda operator);
- `syncs`: reads of a cuda tensor's values on the host (`aten._local_scalar_dense`, what `.item()`,
  `.tolist()`, `bool()`, `int()`, `float()` call), operators whose output shape depends on cuda
  values (`nonzero`, boolean masks) and blocking device-to-host copies. A read has no value to give
  back here, so the first one raises `DeviceSync` after it is recorded;
- `matmuls`: every matrix product with its output dtype.
Each record carries the chain of `src/` frames it was made in, innermost first.

Pinned memory needs a GPU driver, so a tensor counts as pinned when `pinned(t)` marked it (what a
DataLoader with `pin_memory=True` hands over), when it came from the patched `Tensor.pin_memory`, or
when a factory made it with `pin_memory=True`.
"""
from __future__ import annotations

import contextlib
import linecache
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.cuda.amp.common
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

DEVICE = "cuda:0"  # always with its index: FakeTensorMode compares devices literally
SRC = Path(__file__).resolve().parents[1] / "src"
_SRC_PREFIX = str(SRC) + "/"
_PINNED = "_cuda_fake_pinned"

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.addbmm.default,
           aten.mv.default, aten.dot.default}


# ---------------------------------------------------------------------------------------------
# where something happened

@dataclass(frozen=True)
class Frame:
    file: str  # relative to src/
    function: str
    line: int

    @property
    def text(self) -> str:
        return linecache.getline(str(SRC / self.file), self.line).strip()

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.function}: {self.text}"


def src_stack() -> tuple[Frame, ...]:
    """The `src/` frames of the current call chain, innermost first."""
    out, f = [], sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_SRC_PREFIX):
            out.append(Frame(name[len(_SRC_PREFIX):], f.f_code.co_name, f.f_lineno))
        f = f.f_back
    return tuple(out)


@dataclass
class Record:
    what: str
    stack: tuple[Frame, ...]
    dtype: torch.dtype | None = None

    @property
    def site(self) -> Frame | None:
        return self.stack[0] if self.stack else None

    def within(self, file: str, function: str) -> bool:
        """Made inside `function` of src/`file` (at any depth)."""
        return any(f.file == file and f.function == function for f in self.stack)

    def __str__(self) -> str:
        return f"{self.what} at {self.site or '<outside src/>'}"


def describe_error(e: BaseException) -> str:
    """An exception with the `src/` lines it passed through, innermost first."""
    frames = [f"  {f.filename[len(_SRC_PREFIX):]}:{f.lineno} {f.name}: {f.line}"
              for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(_SRC_PREFIX)]
    return "\n".join([f"{type(e).__name__}: {e}"] + frames[::-1])


class DeviceSync(Exception):
    """The host asked for a cuda tensor's values (a GPU would stop and wait here)."""

    def __init__(self, record: Record):
        super().__init__(str(record))
        self.record = record


# ---------------------------------------------------------------------------------------------
# pinned memory stand-in

def pinned(t: torch.Tensor) -> torch.Tensor:
    """Marks `t` as page-locked host memory (a DataLoader with pin_memory=True would hand it over so)."""
    setattr(t, _PINNED, True)
    return t


def is_pinned(t: torch.Tensor) -> bool:
    return bool(getattr(t, _PINNED, False))


def _fake_pin_memory(self, *args, **kwargs):
    return pinned(self.clone())


def _fake_is_pinned(self, *args, **kwargs):
    return is_pinned(self)


# ---------------------------------------------------------------------------------------------
# the spy

def _is_cuda(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def _is_cpu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu"


def _tensors(args, kwargs) -> list[torch.Tensor]:
    """The tensors among an operator's arguments (lists of tensors, as `index` takes, included)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


class CudaSpy(TorchDispatchMode):
    """Records blocking copies, read-backs and matrix products (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.copies: list[Record] = []
        self.syncs: list[Record] = []
        self.matmuls: list[Record] = []

    def _sync(self, what: str) -> None:
        rec = Record(what, src_stack())
        self.syncs.append(rec)
        raise DeviceSync(rec)

    def _h2d(self, src: torch.Tensor, non_blocking: bool, how: str) -> None:
        if non_blocking and is_pinned(src):
            return
        why = "from pageable memory" if non_blocking else "without non_blocking=True"
        self.copies.append(Record(f"blocking host-to-device copy ({how}, {why}, shape {tuple(src.shape)})", src_stack()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and _is_cuda(args[0]):
            self._sync("a cuda tensor's value read on the host (.item(), .tolist(), bool(), int(), float())")
        if func is aten._to_copy.default:
            src, dst = args[0], torch.device(kwargs.get("device") or args[0].device)
            nb = bool(kwargs.get("non_blocking", False))
            if src.device.type == "cpu" and dst.type == "cuda":
                self._h2d(src, nb, "to")
            elif src.device.type == "cuda" and dst.type == "cpu" and not nb:
                self.syncs.append(Record("blocking device-to-host copy", src_stack()))
        elif func is aten.copy_.default:
            dst, src = args[0], args[1]
            nb = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if _is_cpu(src) and _is_cuda(dst):
                self._h2d(src, nb, "copy_")
            elif _is_cuda(src) and _is_cpu(dst) and not nb:
                self.syncs.append(Record("blocking device-to-host copy (copy_)", src_stack()))
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            if not any(map(_is_cuda, _tensors(args, kwargs))):
                raise  # a CPU value: no device involved, but the fake mode has none to give
            self._sync(f"{func}: an output shape that depends on cuda values")
        if func not in (aten._to_copy.default, aten.copy_.default):
            leaves = _tensors(args, kwargs)
            if any(map(_is_cuda, leaves)):
                for x in leaves:
                    if _is_cpu(x) and x.dim() > 0:  # a CPU index into a cuda operator is copied over first
                        self._h2d(x, False, f"CPU operand of {func}")
        if func in MATMULS:
            self.matmuls.append(Record(str(func), src_stack(), out.dtype))
        if kwargs.get("pin_memory") and isinstance(out, torch.Tensor):
            pinned(out)
        return out

    def matmuls_in(self, file: str, function: str) -> list[Record]:
        return [m for m in self.matmuls if m.site is not None and m.site.file == file and m.site.function == function]


# ---------------------------------------------------------------------------------------------
# the mode

@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """FakeTensorMode with CUDA autocast and the pinned-memory stand-in; yields the mode."""
    # autocast("cuda") refuses to start on a machine without a driver unless told CUDA amp is there
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    # autocast("cuda", bfloat16) asks the (absent) device whether it has bf16: answer as a GPU that has it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", _fake_pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", _fake_is_pinned)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def to_fake_cuda(mode: FakeTensorMode, module: torch.nn.Module) -> torch.nn.Module:
    """Moves `module`'s parameters and buffers to fake cuda:0, in place (give it a module of your own:
    a shared one would be left without data)."""
    return module._apply(lambda t: mode.from_tensor(t).to(DEVICE))


def on_host(fn):
    """`fn` run outside the fake mode: host-side work (tokenisation) that reads its own CPU values."""
    def wrapper(*args, **kwargs):
        with _disable_current_modes():
            return fn(*args, **kwargs)
    return wrapper
