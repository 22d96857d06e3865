"""The CUDA paths, checked on a CPU: the training step, the gallery encoder and query composition run on
fake `cuda:0` tensors in fp16, bf16 and fp32 over the tiny CLIP.

The fake mode (tests/cuda_fake.py): PyTorch's FakeTensorMode gives tensors a device, a dtype and a
shape but no data, and runs only each operator's shape and dtype rules, so a CPU machine can follow a
CUDA run op by op. `torch.autocast("cuda", ...)` casts as on a GPU once torch is told CUDA amp is
there; an operator that meets a CPU tensor (other than a 0-dim scalar) and a cuda one raises, as on a
GPU; nothing can be read back (`.item()`, `.tolist()`) and nothing runs backward (that needs a CUDA
context). The CLIP and the
network are deep copies moved to fake cuda:0; token ids, images and the prompt builder are made on
the host first, as the data workers make them. A dispatch-level spy records the host-to-device copies
that block the host, every read-back of a device value, and each matrix product's dtype, with the
src/ line that made it.

Each path is run the way its caller runs it:
- training: `training.training_step` itself (`training.step_only_run`: `TowerFeatures`), with the
  `PromptBuilder.training_texts` ids handed over pinned (the training loader pins its batches on
  CUDA); the step runs as far as its backward pass, which fake tensors cannot run (its one read-back,
  after the optimizer step, is beyond it);
- gallery: `features.encode_gallery` over two pinned image batches;
- queries: `FTI4CIR.compose` under `precision.inference`, on the (g, P) of `features.reference_outputs`,
  then `combine_text_features`, as `features.query_features` does.
The training step and composition run twice and their copy checks look at the second run (a one-time
copy on first use is fine); the gallery encoder may not block at all.

Checked: no CPU tensor meets a cuda one; the dtypes of the attribute transformer's input `P`, of the
outputs and of the two loss matrices (contrastive similarities, orthogonality Gram matrix); no value
read back from the device inside `FTI4CIR.forward` / `compose_tokens`; no host-to-device copy that
blocks the host (any copy but a `non_blocking=True` one from pinned memory) outside the sites in
`KNOWN_BLOCKING`, each of which has its own test that bounds it.
"""
from __future__ import annotations

import contextlib
import copy
import types
from dataclasses import dataclass, field

import pytest
import torch

import features
import training
from cuda_fake import DEVICE, CudaSpy, DeviceSync, Record, describe_error, fake_cuda, on_host, pinned, to_fake_cuda
from datasets import combine_text_features
from features import Encoding, encode_gallery
from feature_store import ReferenceOutputs
from models import FTI4CIR
from precision import inference
from prompts import PromptBuilder

PRECISIONS = ("fp16", "bf16", "fp32")
COMPUTE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # what autocast computes in
CUDA = torch.device(DEVICE)
B = 4  # images per batch
SUBJECTS = ["a red dog", "sky", "two striped shirts", "a car"]
ATTRIBUTES = ["grass", "blue clouds over a hill", "on a chair", "parked by the road at night"]
QUERY_TEXTS = [["is blue", "has dots"], ["is larger", "has no sleeves"], ["at night", "in the rain"], ["red", "shiny"]]

# (file in src/, function) -> the blocking host-to-device copy it is allowed, and why
KNOWN_BLOCKING = {
    ("features.py", "reference_outputs"): "the cached reference outputs, copied to the device once per evaluation",
}


# ---------------------------------------------------------------------------------------------
# running a path on fake cuda

@dataclass
class Observed:
    """What the runs of one path left behind (plain Python values, kept after the fake mode ends)."""

    precision: str
    spies: list[CudaSpy] = field(default_factory=list, repr=False)  # one per run
    stops: list[Record | None] = field(default_factory=list, repr=False)  # the read-back that ended each run, if any
    error: str | None = field(default=None, repr=False)  # the first exception (a CPU/CUDA mix raises)
    # (dtype, device) of each P entering the attribute transformer
    attribute_inputs: list[tuple] = field(default_factory=list, repr=False)
    outputs: dict[str, tuple] = field(default_factory=dict, repr=False)  # name -> (dtype, device, shape)

    @contextlib.contextmanager
    def run(self):
        spy, stop = CudaSpy(), None
        self.spies.append(spy)
        try:
            with spy:
                yield spy
        except DeviceSync as e:
            stop = e.record
        except BackwardReached:
            stop = "backward"
        except Exception as e:  # noqa: BLE001 - reported by the tests
            self.error = self.error or describe_error(e)
        self.stops.append(stop)

    def assert_completed(self, ended_by: str | None = None) -> None:
        """Every run went through without an error, and ended in `ended_by` (a src/ function that reads
        values back) or ran to its end (None)."""
        assert self.error is None, f"{self.precision}: {self.error}"
        ends = [s if s is None or isinstance(s, str) else s.site.function if s.site else str(s) for s in self.stops]
        assert ends == [ended_by] * len(self.spies), f"{self.precision}: runs ended by {ends}"

    def note(self, name: str, t: torch.Tensor) -> None:
        self.outputs[name] = (t.dtype, t.device, tuple(t.shape))

    @property
    def steady(self) -> CudaSpy:
        return self.spies[-1]


def blocking_copies(spy: CudaSpy, file: str, function: str) -> list[Record]:
    """The spy's blocking copies made directly in `function` of src/`file`."""
    return [c for c in spy.copies if c.site and (c.site.file, c.site.function) == (file, function)]


def unexpected_copies(spy: CudaSpy) -> list[str]:
    return [str(c) for c in spy.copies if c.site is None or (c.site.file, c.site.function) not in KNOWN_BLOCKING]


class BackwardReached(Exception):
    """The training step got as far as its backward pass, which fake tensors cannot run."""


class _StopsAtBackward:
    """The step's gradient scaler, up to the backward: scale() gives the loss a backward() that ends the run."""

    def scale(self, loss):
        return types.SimpleNamespace(backward=lambda: (_ for _ in ()).throw(BackwardReached()))


def _models(tiny_clip, train: bool):
    """A CLIP of the test's own (sharing the read-only tokenizer) and a network over it, on the host."""
    clip = copy.deepcopy(tiny_clip, {id(tiny_clip.tokenizer): tiny_clip.tokenizer})
    torch.manual_seed(0)
    net = FTI4CIR.for_clip(clip, num_k=8, topk=5).train(train)
    return clip, net


def _watch(net: FTI4CIR, obs: Observed) -> None:
    net.attributes.register_forward_pre_hook(lambda m, args: obs.attribute_inputs.append((args[0].dtype, args[0].device)))


class _Toy:
    """The little a gallery / query dataset is asked for on these paths."""

    label = "toy"

    def __init__(self, n: int):
        self.names = [f"im{i}" for i in range(n)]
        self.queries = [{"reference_name": name} for name in self.names]

    def __len__(self):
        return len(self.names)


def _image_batches(clip, key: str, n: int) -> list[dict]:
    """What the evaluation loader hands over on CUDA: pinned image batches (make_loader pins them)."""
    torch.manual_seed(2)
    return [{key: pinned(torch.randn(B, 3, clip.image_size, clip.image_size))} for _ in range(n)]


@pytest.fixture(scope="module", params=PRECISIONS)
def training_run(request, tiny_clip) -> Observed:
    precision = request.param
    obs = Observed(precision)
    clip, net = _models(tiny_clip, train=True)
    texts = clip.prompts.training_texts(SUBJECTS, ATTRIBUTES)  # built in the loader's workers
    torch.manual_seed(1)
    batch = {"image": pinned(torch.randn(B, 3, clip.image_size, clip.image_size)),
             "texts": {k: pinned(v) for k, v in texts.items()}}
    with pytest.MonkeyPatch.context() as mp, fake_cuda(mp) as mode:
        to_fake_cuda(mode, clip)
        to_fake_cuda(mode, net)
        _watch(net, obs)
        net.register_forward_hook(lambda m, args, out: obs.outputs.update(
            {k: (v.dtype, v.device, tuple(v.shape)) for k, v in out.items()}))
        run = training.step_only_run(clip, net, CUDA, precision)
        run.scaler = _StopsAtBackward()  # no kernel runs backward here
        for _ in range(2):
            with obs.run():
                training.training_step(run, batch)
    return obs


@pytest.fixture(scope="module", params=PRECISIONS)
def gallery_run(request, tiny_clip) -> Observed:
    precision = request.param
    obs = Observed(precision)
    clip, _ = _models(tiny_clip, train=False)
    batches = _image_batches(clip, "image", 2)
    with pytest.MonkeyPatch.context() as mp, fake_cuda(mp) as mode:
        mp.setattr(features, "make_loader", lambda dataset, encoding, device: batches)
        to_fake_cuda(mode, clip)
        visual = clip.encode_visual

        def encode_visual(images):
            g, P = visual(images)
            obs.note("g", g)
            obs.note("P", P)
            return g, P

        mp.setattr(clip, "encode_visual", encode_visual)
        encoding = Encoding(batch_size=B, workers=0, device=DEVICE, precision=precision, progress=False)
        with obs.run():
            out, _ = encode_gallery(clip, _Toy(B * len(batches)), encoding)
            obs.note("gallery", out)
    return obs


@pytest.fixture(scope="module", params=PRECISIONS)
def compose_run(request, tiny_clip) -> Observed:
    precision = request.param
    obs = Observed(precision)
    clip, net = _models(tiny_clip, train=False)
    batches = _image_batches(clip, "reference_image", 2)
    with pytest.MonkeyPatch.context() as mp, fake_cuda(mp) as mode:
        mp.setattr(features, "make_loader", lambda dataset, encoding, device: batches)
        # tokenisation is host work that reads its own CPU values: run it outside the fake mode
        mp.setattr(PromptBuilder, "query_tails", on_host(PromptBuilder.query_tails))
        to_fake_cuda(mode, clip)
        to_fake_cuda(mode, net)
        _watch(net, obs)
        encoding = Encoding(batch_size=B, workers=0, device=DEVICE, precision=precision, progress=False)
        dataset = _Toy(B * len(batches))
        references = features.reference_outputs(clip, dataset, list(range(len(dataset))), None, encoding, CUDA)
        for _ in batches:
            with obs.run():
                g, P = next(references)
                with inference(precision, CUDA):
                    f = net.compose(clip, g, P, QUERY_TEXTS)
                obs.note("compose", f)
                obs.note("query", combine_text_features(f))
    return obs


# ---------------------------------------------------------------------------------------------
# training step

def test_training_step_runs_on_cuda(training_run):
    training_run.assert_completed(ended_by="backward")  # as far as the backward pass, twice
    assert set(training_run.outputs) == set(training.LOSS_KEYS)
    for name, (dtype, device, shape) in training_run.outputs.items():
        assert (dtype, device, shape) == (torch.float32, CUDA, ()), name


def test_training_forward_reads_nothing_back(training_run):
    """Nothing is read back from the device before the backward pass: the step's one read (its losses
    and flags, `.tolist()`) comes after the whole step is queued."""
    for spy in training_run.spies:
        assert spy.syncs == [], [str(s) for s in spy.syncs]


def test_training_attribute_transformer_input(training_run):
    expected = (COMPUTE[training_run.precision], CUDA)
    assert training_run.attribute_inputs and set(training_run.attribute_inputs) == {expected}


@pytest.mark.parametrize("training_run", ["fp16", "fp32"], indirect=True)
def test_loss_matrices_in_the_autocast_dtype(training_run):
    """fp16 keeps the authors' arithmetic: both loss matrices come from fp16 matmuls under autocast."""
    expected = COMPUTE[training_run.precision]
    for function in ("contrastive_loss", "orthogonality_loss"):
        products = training_run.steady.matmuls_in("models.py", function)
        assert products and {m.dtype for m in products} == {expected}, (function, [m.dtype for m in products])


@pytest.mark.parametrize("training_run", ["bf16"], indirect=True)
def test_bf16_contrastive_similarity_is_float32(training_run):
    """Under bf16 autocast `.float()` alone would be undone: the similarity product runs with autocast off."""
    products = training_run.steady.matmuls_in("models.py", "contrastive_loss")
    assert products and {m.dtype for m in products} == {torch.float32}, [m.dtype for m in products]


@pytest.mark.parametrize("training_run", ["bf16"], indirect=True)
def test_bf16_orthogonality_gram_is_float32(training_run):
    products = training_run.steady.matmuls_in("models.py", "orthogonality_loss")
    assert products and {m.dtype for m in products} == {torch.float32}, [m.dtype for m in products]


def test_training_step_copies_without_blocking(training_run):
    """Images and token ids reach the device without blocking; the only blocking copies are known ones."""
    assert unexpected_copies(training_run.steady) == []


@pytest.mark.parametrize("training_run", ["fp16"], indirect=True)
@pytest.mark.parametrize("compose_run", ["fp16"], indirect=True)
def test_pseudo_word_sentence_copies_nothing_blocking(training_run, compose_run):
    """The prefix and its length are copied to the device once, not in every step."""
    training_run.assert_completed(ended_by="backward")
    compose_run.assert_completed()
    found = blocking_copies(training_run.steady, "prompts.py", "pseudo_word_sentence")
    found += blocking_copies(compose_run.steady, "prompts.py", "pseudo_word_sentence")
    assert found == [], [str(c) for c in found]


@pytest.mark.parametrize("training_run", ["fp16"], indirect=True)
def test_stop_flag_copies_nothing_blocking(training_run):
    """The stop and failure flags are written into a preallocated device tensor (`fill_`), not copied."""
    training_run.assert_completed(ended_by="backward")
    found = blocking_copies(training_run.steady, "training.py", "_set_flags")
    assert found == [], [str(c) for c in found]


# ---------------------------------------------------------------------------------------------
# gallery encoder

def test_gallery_loader_pins_memory_on_cuda():
    """What lets the fixtures hand the evaluation paths pinned batches."""
    assert features.make_loader(_Toy(3), Encoding(batch_size=2, workers=0), CUDA).pin_memory


def test_gallery_encoder_runs_on_cuda(gallery_run, tiny_clip):
    gallery_run.assert_completed()
    dtype = COMPUTE[gallery_run.precision]
    assert gallery_run.outputs["g"][:2] == (dtype, CUDA)
    assert gallery_run.outputs["P"][:2] == (dtype, CUDA)
    assert gallery_run.outputs["gallery"] == (torch.float32, CUDA, (2 * B, tiny_clip.embed_dim))


def test_gallery_encoder_neither_blocks_nor_reads_back(gallery_run):
    spy = gallery_run.steady
    assert [str(c) for c in spy.copies] == []
    assert [str(s) for s in spy.syncs] == []


# ---------------------------------------------------------------------------------------------
# query composition

def test_query_composition_runs_on_cuda(compose_run, tiny_clip):
    compose_run.assert_completed()
    dtype = COMPUTE[compose_run.precision]
    assert set(compose_run.attribute_inputs) == {(dtype, CUDA)}
    assert compose_run.outputs["compose"] == (dtype, CUDA, (B, 2, tiny_clip.embed_dim))
    assert compose_run.outputs["query"] == (torch.float32, CUDA, (B, tiny_clip.embed_dim))


def test_query_composition_reads_nothing_back(compose_run):
    """Neither the visual pass nor `compose` / `compose_tokens` waits for the device."""
    for spy in compose_run.spies:
        assert [str(s) for s in spy.syncs] == []


def test_query_composition_copies_without_blocking(compose_run):
    assert unexpected_copies(compose_run.steady) == []


@pytest.mark.parametrize("compose_run", ["fp16"], indirect=True)
def test_compose_moves_query_words_without_blocking(compose_run):
    """The query's word ids go to the device from pinned memory, without blocking."""
    compose_run.assert_completed()
    found = blocking_copies(compose_run.steady, "models.py", "compose")
    assert found == [], [str(c) for c in found]


def test_reference_outputs_copy_once_not_per_batch(tiny_clip):
    """Cached reference outputs go to the device once (one copy of the whole set), not once per batch."""
    obs = Observed("fp16")
    clip, _ = _models(tiny_clip, train=False)
    torch.manual_seed(3)
    with torch.no_grad():
        g, P = clip.encode_visual(torch.randn(3 * B, 3, clip.image_size, clip.image_size))
    dataset = _Toy(3 * B)
    references = ReferenceOutputs(dataset.names, g, P)  # float32 on the host, as gallery_features gives them
    encoding = Encoding(batch_size=B, workers=0, device=DEVICE, precision="fp16", progress=False)
    per_batch = []
    with pytest.MonkeyPatch.context() as mp, fake_cuda(mp):
        with obs.run() as spy:
            for _, P_dev in features.reference_outputs(clip, dataset, list(range(3 * B)), references, encoding, CUDA):
                obs.note("P", P_dev)
                per_batch.append(len(blocking_copies(spy, "features.py", "reference_outputs")))
    obs.assert_completed()
    assert obs.outputs["P"][1] == CUDA and len(per_batch) == 3
    assert per_batch[0] > 0 and per_batch[1:] == [per_batch[0]] * 2, per_batch  # nothing more after the first


# ---------------------------------------------------------------------------------------------
# the spy itself

def test_spy_sees_blocking_copies_and_read_backs(monkeypatch):
    """Every way of copying to the device that blocks is recorded, the non-blocking one from pinned
    memory is not; every way of reading a device value back is recorded."""
    with fake_cuda(monkeypatch), CudaSpy() as spy:
        x = torch.arange(6.0)
        x.to(DEVICE)
        x.cuda()
        torch.tensor([1, 2], device=DEVICE)
        torch.as_tensor([1, 2], device=DEVICE)
        x.to(DEVICE, non_blocking=True)  # pageable
        torch.zeros(6, device=DEVICE).copy_(x)
        torch.zeros(6, device=DEVICE)[torch.arange(2)]  # a CPU index is copied over first
        assert len(spy.copies) == 7, [str(c) for c in spy.copies]
        pinned(x).to(DEVICE, non_blocking=True)
        x.pin_memory().to(DEVICE, non_blocking=True)
        assert len(spy.copies) == 7, [str(c) for c in spy.copies]
        y = torch.ones(3, device=DEVICE)
        y.cpu()
        assert len(spy.syncs) == 1
        for read in (lambda: y.sum().item(), lambda: y.tolist(), lambda: bool(y.sum()), lambda: int(y[0]),
                     lambda: y.nonzero()):
            with pytest.raises(DeviceSync):
                read()
        assert len(spy.syncs) == 6
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y[None].float() @ y[:, None].float()  # autocast casts float32 operands of a matmul down
        assert [m.dtype for m in spy.matmuls] == [torch.bfloat16]
