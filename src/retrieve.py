"""Composed image retrieval over any folder of images with FTI4CIR (or a baseline).

    python src/retrieve.py --model-path model_save/checkpoints/epoch_60.pt --gallery ./photos \
        --reference ./photos/dog.jpg --text "is a cat instead" --top 10

Every image under --gallery (recursive; jpg, jpeg, png, webp, bmp, gif, tif, tiff) is a candidate.
Prints each query's ranked files with their cosine similarity, writes `<save-path>/results.json` and
`<save-path>/results.png` (reference, text, top K). The gallery's features go into the same cache as
evaluate.py's (`--cache-dir`), so the next query over the same folder encodes only itself.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from checkpoint import load_model
from cli import FlagParser, add_model_args, check_model_outputs, clip_args, encoding_from_args, model_device, script_main
from clip_loader import load_clip
from datasets import ImageLoadError
from folder_search import check_gallery, collect_queries, save_grid
from fti4cir_api import FTI4CIRModel
from logs import get_logger
from utils import atomic_write_json

log = get_logger("retrieve")


def build_parser() -> FlagParser:
    parser = FlagParser(description="Composed image retrieval over a folder of images: a reference image plus a "
                                    "modification text -> the folder's images, best first.")
    parser.add_argument("--gallery", required=True, metavar="DIR",
                        help="folder of candidate images, searched recursively (hidden folders skipped)")
    parser.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                        help="reference image of a query (repeatable; paired in order with --text)")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT",
                        help="modification text of a query (repeatable; paired in order with --reference)")
    parser.add_argument("--queries", default=None, metavar="FILE.jsonl",
                        help='more queries, one {"reference": IMAGE, "text": "..."} a line (paths relative to the '
                             "current folder, like --reference)")
    parser.add_argument("--top", type=int, default=10, metavar="K", help="results per query")
    parser.add_argument("--exclude-reference", action="store_true",
                        help="leave a reference that is itself in the gallery out of its own ranking (as CIRR does)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out gallery images that cannot be read, counted in one warning line that names the "
                             "first few (without it, the first one stops the run naming the file)")
    add_model_args(parser, default_save_path="./results/retrieve")
    return parser


@script_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = model_device(args)  # every input checked before CLIP is loaded
    check_gallery(args.gallery)
    queries = collect_queries(args.reference, args.text, args.queries)
    check_model_outputs(args)
    clip = load_clip(**clip_args(args), device=device)
    net = load_model(args.model_path, clip, device, args.baseline)
    encoding = encoding_from_args(args, device)
    # the Python API's model (fti4cir_api), so the script and the API rank through one path
    model = FTI4CIRModel(net, clip, preprocess_type=args.preprocess_type, batch_size=encoding.batch_size,
                         workers=encoding.workers, precision=encoding.precision,
                         cache_dir=None if args.no_cache else args.cache_dir, cache_hash_images=args.cache_hash_images,
                         progress=encoding.progress)
    t = time.perf_counter()
    try:
        index = model.index(args.gallery, skip_bad_images=args.skip_bad_images)
    except ImageLoadError as e:
        if args.skip_bad_images:
            raise
        raise ImageLoadError(f"{e}; or pass --skip-bad-images to rank the other images, the unreadable ones "
                             "left out and named in a warning") from e
    results = model.rank(index, queries, args.top, args.baseline, args.exclude_reference)
    log.info(f"{len(results.retrieval.names)} gallery images, {len(queries)} queries ranked in "
             f"{1000 * (time.perf_counter() - t):.0f} ms")
    out = results.to_dict()
    out.update(model=args.model_path, baseline=args.baseline, clip=clip.name, clip_source=str(clip.source),
               exclude_reference=args.exclude_reference)
    for i, q in enumerate(out["queries"], 1):
        print(f"\nquery {i}: {q['reference']} + \"{q['text']}\"")
        for res in q["results"]:
            print(f"  {res['rank']:>4}  {res['score']:.4f}  {res['path']}")
    save = Path(args.save_path)
    atomic_write_json(out, save / "results.json")
    grid = save_grid(results, save / "results.png")
    print(f"\nwrote {save / 'results.json'} and {grid}", flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
