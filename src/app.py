"""A browser app over a folder of images: upload a reference image, type what to change, see the folder's
best matches, the composed sentence with the pseudo-words FTI4CIR wrote for the image, and where in the
image each attribute word looks.

    .venv/bin/pip install -r requirements-app.txt      # gradio, once
    .venv/bin/python src/app.py --gallery ./photos --model-path FTI4CIR_released.pt \
        --clip-weights ~/.cache/clip/ViT-L-14.pt --port 7860

The gallery is encoded at start (a progress bar) into the same cache as evaluate.py's and retrieve.py's
(`--cache-dir`), so the next start over the same folder encodes nothing. A pseudo-word is a vector, not a
word: it is shown as its nearest tokens in CLIP's vocabulary by cosine similarity of token embeddings.
Each heat map is the attention of the word's template over CLIP's patches (docs/METHOD.md §10, "What
explain shows"), drawn over the image as CLIP sees it (padded, resized and cropped).
"""
from __future__ import annotations

import html
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cli import FlagParser, add_clip_args, add_device_arg, script_main
from errors import ConfigError, UserError
from feature_store import DEFAULT_CACHE_DIR
from folder_search import check_gallery
from logs import get_logger
from precision import PRECISIONS
from transforms import PREPROCESS_TYPES

log = get_logger("app")

INSTALL = ".venv/bin/pip install -r requirements-app.txt"
# inferno-like colour ramp for the heat maps: (position, RGB)
RAMP = [(0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)), (1.0, (252, 255, 164))]
CSS = """
.fti-subject { background: #ffd166; border-radius: 4px; padding: 0 4px; font-weight: 600; }
.fti-attr { background: #8ecae6; border-radius: 4px; padding: 0 4px; font-weight: 600; }
.fti-sentence { font-size: 1.15em; line-height: 2; }
.fti-words td, .fti-words th { padding: 2px 8px; text-align: left; }
"""


class MissingPackage(UserError):
    """An optional package the app needs is not installed."""


def build_parser() -> FlagParser:
    parser = FlagParser(description="Composed image retrieval in the browser: FTI4CIR over a folder of images, with "
                                    "the pseudo-words it writes for the reference image.")
    parser.add_argument("--gallery", required=True, metavar="DIR",
                        help="folder of candidate images, searched recursively (hidden folders skipped)")
    parser.add_argument("--model-path", required=True,
                        help="FTI4CIR checkpoint: this repo's (src/train.py) or the authors' released file; or "
                             "hf-hub:OWNER/REPO/FILE")
    add_clip_args(parser)
    add_device_arg(parser)
    parser.add_argument("--port", type=int, default=7860, help="port the app listens on")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the app listens on (0.0.0.0: reachable from other machines)")
    parser.add_argument("--top", type=int, default=10, metavar="K", help="results shown per search")
    parser.add_argument("--preprocess-type", choices=list(PREPROCESS_TYPES), default="targetpad",
                        help="image preprocessing: targetpad (ratio 1.25, the authors') or CLIP's own")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", "--num-workers", dest="workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes for the gallery (0: load in the main process)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="fp32: the authors' inference; tf32 (CUDA), bf16 (CUDA, CPU), fp16 (CUDA): faster")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="gallery features are stored here (the cache evaluate.py and retrieve.py use)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the gallery cache")
    return parser


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local app
    try:
        import gradio
    except ImportError:
        raise MissingPackage(f"the app needs gradio, which is not installed; install it with: {INSTALL}") from None
    return gradio


# ---------------------------------------------------------------------------------------------
# drawing

def heatmap(view: Image.Image, patch_map, size: int = 224) -> Image.Image:
    """The patch map [grid, grid] in colour over the image CLIP saw, each patch one block, scaled to `size`."""
    m = np.asarray(patch_map, dtype=np.float32)
    m = m / m.max() if m.max() > 0 else m
    xs = [p for p, _ in RAMP]
    colour = np.stack([np.interp(m, xs, [c[i] for _, c in RAMP]) for i in range(3)], axis=-1).astype(np.uint8)
    over = Image.fromarray(colour).resize((size, size), Image.NEAREST)
    base = view.convert("RGB").resize((size, size), Image.BICUBIC)
    return Image.blend(base, over, 0.5)


def sentence_html(explanation, text: str) -> str:
    """The composed sentence, the subject and attribute words marked, each with its nearest tokens on hover."""
    def word(w, cls):
        near = ", ".join(f"{t} {c:.2f}" for t, c in w.nearest)
        return f'<span class="{cls}" title="{html.escape(near)}">[{html.escape(w.word)}]</span>'

    attrs = " ".join(word(a, "fti-attr") for a in explanation.attributes)
    return (f'<div class="fti-sentence">a photo of {word(explanation.subject, "fti-subject")} with {attrs} '
            f"but {html.escape(text)}</div>")


def words_html(explanation) -> str:
    """One row per pseudo-word: its nearest vocabulary tokens (cosine similarity), its template and score."""
    rows = [("subject", explanation.subject, "", "")]
    rows += [(f"attribute {i + 1}", a, str(a.template), f"{a.score:.3f}") for i, a in enumerate(explanation.attributes)]
    body = "".join(f"<tr><td>{role}</td><td>{html.escape(', '.join(f'{t} ({c:.2f})' for t, c in w.nearest))}</td>"
                   f"<td>{k}</td><td>{s}</td></tr>" for role, w, k, s in rows)
    return (f"<p>r = {explanation.r} attribute words. Each pseudo-word is a vector; shown are its nearest tokens in "
            "CLIP's vocabulary (cosine similarity of token embeddings).</p>"
            '<table class="fti-words"><tr><th>word</th><th>nearest tokens</th><th>template</th>'
            f"<th>selection score</th></tr>{body}</table>")


def hits_items(index, hits) -> list[tuple[str, str]]:
    root = index.dataset.root
    return [(path, f"{score:.4f}  {Path(path).relative_to(root)}") for path, score in hits]


# ---------------------------------------------------------------------------------------------
# the app

def build_app(gr, model, index, top: int, header: str):
    """The Blocks of the app over `index` (model.index's): reference + text -> results, words, heat maps."""
    from fti4cir_api import InputError

    def search(reference, text, baselines):
        if not reference:
            raise gr.Error("upload a reference image first")
        if not text or not text.strip():
            raise gr.Error("type what to change in the reference image, e.g. 'is red with long sleeves'")
        try:
            hits = model.search(index, reference, text, top=top)
            e = model.explain(reference)
            extra = [model.search(index, reference, text, top=top, baseline=b) for b in ("image-only", "text-only")] \
                if baselines else [[], []]
        except InputError as err:
            raise gr.Error(str(err)) from None
        maps = [(heatmap(e.view, a.patch_map), f"[{a.word}] {a.score:.3f}") for a in e.attributes]
        return (hits_items(index, hits), sentence_html(e, text), words_html(e), maps,
                gr.update(visible=bool(baselines)), hits_items(index, extra[0]), hits_items(index, extra[1]))

    with gr.Blocks(title="FTI4CIR") as demo:
        gr.Markdown(header)
        with gr.Row():
            with gr.Column(scale=1):
                reference = gr.Image(type="filepath", label="reference image", elem_id="reference", height=280)
                text = gr.Textbox(label="what to change", placeholder="is red with long sleeves", elem_id="query-text")
                baselines = gr.Checkbox(label="also show the image-only and text-only baselines", elem_id="baselines")
                button = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=2):
                sentence = gr.HTML(label="composed sentence", elem_id="sentence")
                words = gr.HTML(elem_id="words")
                maps = gr.Gallery(label="where each attribute word looks (its template's attention over CLIP's "
                                        "patches)", columns=6, height=240, elem_id="heatmaps")
        results = gr.Gallery(label=f"FTI4CIR: top {top} (cosine similarity)", columns=min(top, 5), height="auto",
                             elem_id="results")
        with gr.Row(visible=False) as baseline_row:
            image_only = gr.Gallery(label="image-only baseline", columns=min(top, 5), height=320, elem_id="image-only")
            text_only = gr.Gallery(label="text-only baseline", columns=min(top, 5), height=320, elem_id="text-only")
        outputs = [results, sentence, words, maps, baseline_row, image_only, text_only]
        button.click(search, [reference, text, baselines], outputs)
        text.submit(search, [reference, text, baselines], outputs)
    return demo


@script_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    gr = import_gradio()
    check_gallery(args.gallery)
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    from fti4cir_api import load
    from hub import is_hub_reference

    for value, flag in ((args.model_path, "--model-path"), (args.clip_weights, "--clip-weights")):
        if value is not None and not is_hub_reference(value) and not Path(value).is_file():
            raise ConfigError(f"{flag} {value}: no such file")
    model = load(args.model_path, args.clip_weights, clip_model=args.clip_model, clip_format=args.clip_format,
                 clip_pretrained=args.clip_pretrained, device=args.device, preprocess_type=args.preprocess_type,
                 batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                 cache_dir=None if args.no_cache else args.cache_dir, progress=False)
    hits_before = model.counters.cache_hits
    log.info(f"gallery {args.gallery}: reading its features from the cache, or encoding them")
    index = model.index(args.gallery, progress=True)
    source = "from the cache" if model.counters.cache_hits > hits_before else "encoded at start"
    log.info(f"gallery {args.gallery}: {len(index)} images ({source})")
    header = (f"## FTI4CIR: composed image retrieval\nGallery `{args.gallery}`: {len(index)} images "
              f"(features {source}). "
              f"Model `{args.model_path}` over CLIP `{model.clip.name}`.")
    demo = build_app(gr, model, index, args.top, header)
    demo.queue().launch(server_name=args.host, server_port=args.port, allowed_paths=[str(Path(args.gallery).resolve())],
                        css=CSS, show_error=True)


if __name__ == "__main__":
    main(sys.argv[1:])
