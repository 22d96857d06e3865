"""Retrieval metrics and test-server submission files for FashionIQ, CIRR and CIRCO (METHOD §10-12).

Pure functions of tensors and lists of names; no I/O. Features are L2-normalised by the caller, so
the similarity is the dot product `query @ gallery.T`. Rankings come from `torch.topk` on query
chunks, so memory stays at `chunk x G` similarities and no full sort of the gallery is ever made.
All percentages are in [0, 100].
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from errors import UserError

class MetricsError(UserError, ValueError):
    """Features, names or annotations the metrics cannot be computed from (the message says which)."""


class SubmissionError(MetricsError):
    """A submission file a test server would reject (every problem listed)."""


DEFAULT_CHUNK = 256
CIRR_TOP = 50          # names per query in cirr.json / circo.json (METHOD §12)
CIRR_SUBSET_TOP = 3    # names per query in subset_cirr.json
CIRCO_TOP = 50         # mAP / recall are computed over the top 50 (METHOD §11)


# ----------------------------------------------------------------------------------------------
# ranking primitives

def _prepare(query_feats: torch.Tensor, gallery_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if query_feats.dim() != 2 or gallery_feats.dim() != 2:
        raise MetricsError(f"features must be 2-D [N, D]; got query {tuple(query_feats.shape)}, "
                         f"gallery {tuple(gallery_feats.shape)}")
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise MetricsError(f"feature sizes differ: query D={query_feats.shape[1]}, gallery D={gallery_feats.shape[1]}")
    g = gallery_feats
    if g.device.type == "cpu" and g.dtype in (torch.float16, torch.bfloat16):
        g = g.float()  # half-precision matmul on CPU is slow or unsupported
    return query_feats, g


def _chunk_sims(q: torch.Tensor, g: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    return q[start:start + chunk].to(device=g.device, dtype=g.dtype) @ g.T


def _mask_excluded(sims: torch.Tensor, exclude: torch.Tensor | None) -> None:
    """Set sims[i, exclude[i]] = -inf in place where exclude[i] >= 0."""
    if exclude is None:
        return
    exclude = exclude.to(sims.device)
    rows = torch.nonzero(exclude >= 0).squeeze(1)
    sims[rows, exclude[rows]] = float("-inf")


def topk_indices(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int,
                 exclude: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Indices [Q, k] (CPU, int64) of the k most similar gallery items per query, best first.

    `exclude[i]` is a gallery index removed from query i's ranking (its similarity set to -inf),
    or -1 for none.
    """
    q, g = _prepare(query_feats, gallery_feats)
    n_q, n_g = q.shape[0], g.shape[0]
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.long)
        if exclude.shape != (n_q,):
            raise MetricsError(f"exclude must have shape [{n_q}], got {tuple(exclude.shape)}")
        if (exclude >= n_g).any():
            raise MetricsError(f"exclude holds index {int(exclude.max())} >= gallery size {n_g}")
    available = n_g - (1 if exclude is not None and bool((exclude >= 0).any()) else 0)
    if not 1 <= k <= available:
        raise MetricsError(f"k={k} must be between 1 and {available} (gallery of {n_g}"
                         f"{', one item excluded per query' if available < n_g else ''})")
    out = torch.empty((n_q, k), dtype=torch.long)
    for s in range(0, n_q, chunk):
        sims = _chunk_sims(q, g, s, chunk)
        _mask_excluded(sims, None if exclude is None else exclude[s:s + chunk])
        out[s:s + sims.shape[0]] = sims.topk(k, dim=1, largest=True, sorted=True).indices.cpu()
    return out


def _index_of(names: Sequence, lookup: Mapping, what: str) -> torch.Tensor:
    """Gallery indices of `names`; a name absent from the gallery is an error naming it."""
    missing = [n for n in names if n not in lookup]
    if missing:
        raise MetricsError(f"{len(missing)} {what} not in the gallery, e.g. {missing[:5]}")
    return torch.tensor([lookup[n] for n in names], dtype=torch.long)


def _lookup(names: Sequence) -> dict:
    lookup = {n: i for i, n in enumerate(names)}
    if len(lookup) != len(names):
        raise MetricsError(f"gallery names are not unique ({len(names) - len(lookup)} duplicates)")
    return lookup


def _check_rows(n: int, **lists) -> None:
    for name, value in lists.items():
        if len(value) != n:
            raise MetricsError(f"{name} has {len(value)} entries but there are {n} queries")


def _percent(hits: torch.Tensor) -> float:
    return float(hits.float().mean().item() * 100.0)


# ----------------------------------------------------------------------------------------------
# FashionIQ

def fashioniq_recall(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_names: Sequence[str],
                     target_names: Sequence[str], ks: Iterable[int] = (10, 50),
                     chunk: int = DEFAULT_CHUNK) -> dict[int, float]:
    """Recall@K in percent for one FashionIQ category; the reference is NOT removed (METHOD §11)."""
    ks = tuple(ks)
    _check_rows(query_feats.shape[0], target_names=target_names)
    if len(gallery_names) != gallery_feats.shape[0]:
        raise MetricsError(f"{len(gallery_names)} gallery names for {gallery_feats.shape[0]} gallery features")
    target = _index_of(target_names, _lookup(gallery_names), "target names")
    top = topk_indices(query_feats, gallery_feats, max(ks), chunk=chunk)
    hit = top == target[:, None]
    return {k: _percent(hit[:, :k].any(dim=1)) for k in ks}


# ----------------------------------------------------------------------------------------------
# CIRR

def _member_index(group_members: Sequence[Sequence[str]], lookup: Mapping) -> torch.Tensor:
    widths = {len(m) for m in group_members}
    if len(widths) > 1:
        raise MetricsError(f"group_members lists differ in length: {sorted(widths)}")
    flat = [n for m in group_members for n in m]
    idx = _index_of(flat, lookup, "group member names")
    return idx.view(len(group_members), -1)


def _cirr_rankings(q: torch.Tensor, g: torch.Tensor, ref: torch.Tensor, members: torch.Tensor,
                   k: int, subset_k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery indices over the whole gallery and top-subset_k within each query's members,
    the reference removed from both, in one pass over the similarities."""
    n_q, n_g = q.shape[0], g.shape[0]
    if not 1 <= k <= n_g - 1:
        raise MetricsError(f"k={k} must be between 1 and {n_g - 1} (gallery of {n_g}, reference removed)")
    # Members equal to the reference, or repeated, must not count: the subset ranking holds each
    # gallery image at most once and never the reference.
    same = members[:, :, None] == members[:, None, :]
    repeat = (same & torch.ones_like(same[0]).triu(1)).any(dim=1)
    invalid = repeat | (members == ref[:, None])
    valid = (~invalid).sum(dim=1)
    if int(valid.min()) < subset_k:
        bad = int(torch.nonzero(valid < subset_k)[0, 0])
        raise MetricsError(f"query {bad}: only {int(valid[bad])} distinct group members besides the reference, "
                         f"need {subset_k}")
    top = torch.empty((n_q, k), dtype=torch.long)
    sub = torch.empty((n_q, subset_k), dtype=torch.long)
    for s in range(0, n_q, chunk):
        sims = _chunk_sims(q, g, s, chunk)
        m = members[s:s + chunk].to(sims.device)
        member_sims = sims.gather(1, m)
        member_sims[invalid[s:s + chunk].to(sims.device)] = float("-inf")
        pick = member_sims.topk(subset_k, dim=1, sorted=True).indices
        sub[s:s + sims.shape[0]] = m.gather(1, pick).cpu()
        _mask_excluded(sims, ref[s:s + chunk])
        top[s:s + sims.shape[0]] = sims.topk(k, dim=1, sorted=True).indices.cpu()
    return top, sub


def cirr_recall(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_names: Sequence[str],
                reference_names: Sequence[str], target_names: Sequence[str],
                group_members: Sequence[Sequence[str]], ks: Iterable[int] = (1, 5, 10, 50),
                subset_ks: Iterable[int] = (1, 2, 3), chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """CIRR Recall@K over the gallery and Recall_subset@K over `img_set.members`, reference removed.

    Keys `cirr_recall_at{K}` and `cirr_group_recall_at{K}`, values in percent.
    """
    ks, subset_ks = tuple(ks), tuple(subset_ks)
    n_q = query_feats.shape[0]
    _check_rows(n_q, reference_names=reference_names, target_names=target_names, group_members=group_members)
    if len(gallery_names) != gallery_feats.shape[0]:
        raise MetricsError(f"{len(gallery_names)} gallery names for {gallery_feats.shape[0]} gallery features")
    lookup = _lookup(gallery_names)
    ref = _index_of(reference_names, lookup, "reference names")
    target = _index_of(target_names, lookup, "target names")
    members = _member_index(group_members, lookup)
    q, g = _prepare(query_feats, gallery_feats)
    top, sub = _cirr_rankings(q, g, ref, members, max(ks), max(subset_ks), chunk)
    hit = top == target[:, None]
    sub_hit = sub == target[:, None]
    out = {f"cirr_recall_at{k}": _percent(hit[:, :k].any(dim=1)) for k in ks}
    out.update({f"cirr_group_recall_at{k}": _percent(sub_hit[:, :k].any(dim=1)) for k in subset_ks})
    return out


def cirr_submission(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_names: Sequence[str],
                    reference_names: Sequence[str], group_members: Sequence[Sequence[str]],
                    pair_ids: Sequence, chunk: int = DEFAULT_CHUNK, top: int = CIRR_TOP) -> tuple[dict, dict]:
    """The two CIRR test-server dicts of METHOD §12: (cirr.json, subset_cirr.json).

    `top` names per list (the server's 50); a smaller toy gallery needs fewer.
    """
    n_q = query_feats.shape[0]
    _check_rows(n_q, reference_names=reference_names, group_members=group_members, pair_ids=pair_ids)
    if len(gallery_names) != gallery_feats.shape[0]:
        raise MetricsError(f"{len(gallery_names)} gallery names for {gallery_feats.shape[0]} gallery features")
    lookup = _lookup(gallery_names)
    ref = _index_of(reference_names, lookup, "reference names")
    members = _member_index(group_members, lookup)
    q, g = _prepare(query_feats, gallery_feats)
    ranked, sub = _cirr_rankings(q, g, ref, members, top, CIRR_SUBSET_TOP, chunk)
    names = np.asarray(list(gallery_names), dtype=object)
    keys = [str(p) for p in pair_ids]
    full = {"version": "rc2", "metric": "recall"}
    full.update(zip(keys, names[ranked.numpy()].tolist()))
    subset = {"version": "rc2", "metric": "recall_subset"}
    subset.update(zip(keys, names[sub.numpy()].tolist()))
    return full, subset


# ----------------------------------------------------------------------------------------------
# CIRCO

def _gt_index(gt_ids: Sequence[Sequence], lookup: Mapping) -> torch.Tensor:
    """[Q, L] gallery indices of each query's distinct ground truths (target first), -1 padded.

    Empty strings / None are the authors' padding and are ignored.
    """
    rows = []
    for i, gts in enumerate(gt_ids):
        kept = []
        for x in gts:
            if x is None or str(x) == "":
                continue
            x = str(x)
            if x not in kept:
                kept.append(x)
        if not gts or gts[0] is None or str(gts[0]) == "":
            raise MetricsError(f"query {i}: the first ground-truth id must be the target, got {list(gts)[:3]}")
        rows.append(kept)
    flat = [x for r in rows for x in r]
    idx = _index_of(flat, lookup, "ground-truth ids")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    out[torch.arange(width)[None, :] < lengths[:, None]] = idx
    return out


def circo_per_query(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_ids: Sequence,
                    gt_ids: Sequence[Sequence], ks: Iterable[int] = (5, 10, 25, 50),
                    chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """Each query's CIRCO AP@K (in [0, 1]) and target hit@K (0 or 1) over the top 50, as float tensors
    [Q] keyed `circo_map_at{K}` / `circo_recall_at{K}`; `circo_map_recall` gives their means in percent.

    AP@K = (1 / min(|GT|, K)) * sum_{j<=K} precision@j * rel_j. The reference is NOT removed (code).
    """
    ks = tuple(ks)
    _check_rows(query_feats.shape[0], gt_ids=gt_ids)
    if len(gallery_ids) != gallery_feats.shape[0]:
        raise MetricsError(f"{len(gallery_ids)} gallery ids for {gallery_feats.shape[0]} gallery features")
    gt = _gt_index(gt_ids, _lookup([str(x) for x in gallery_ids]))
    # a gallery smaller than 50 gives a shorter ranking, as slicing the authors' sorted list does
    top = topk_indices(query_feats, gallery_feats, min(max(max(ks), CIRCO_TOP), len(gallery_ids)), chunk=chunk)
    rel = (top[:, :, None] == gt[:, None, :]).any(dim=2).float()            # [Q, 50]
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float32)
    prec_rel = rel.cumsum(dim=1) / ranks * rel                               # precision@j * rel_j
    n_gt = (gt >= 0).sum(dim=1).float()
    target_hit = top == gt[:, :1]
    out = {f"circo_map_at{k}": prec_rel[:, :k].sum(dim=1) / torch.clamp(n_gt, max=k) for k in ks}
    out.update({f"circo_recall_at{k}": target_hit[:, :k].any(dim=1).float() for k in ks})
    return out


def circo_map_recall(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_ids: Sequence,
                     gt_ids: Sequence[Sequence], ks: Iterable[int] = (5, 10, 25, 50),
                     chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """CIRCO mAP@K and Recall@K (single target = gt_ids[i][0]) in percent over the top 50: the means of
    `circo_per_query`. Keys `circo_map_at{K}`, `circo_recall_at{K}`."""
    return {key: float(v.mean().item() * 100.0)
            for key, v in circo_per_query(query_feats, gallery_feats, gallery_ids, gt_ids, ks, chunk).items()}


def circo_submission(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_ids: Sequence,
                     query_ids: Sequence, chunk: int = DEFAULT_CHUNK, top: int = CIRCO_TOP) -> dict[str, list[str]]:
    """The CIRCO test-server dict of METHOD §12: {"<query id>": [50 gallery ids as str, best first]}
    (`top` ids per list: the server's 50; a smaller toy gallery needs fewer)."""
    _check_rows(query_feats.shape[0], query_ids=query_ids)
    if len(gallery_ids) != gallery_feats.shape[0]:
        raise MetricsError(f"{len(gallery_ids)} gallery ids for {gallery_feats.shape[0]} gallery features")
    ranked = topk_indices(query_feats, gallery_feats, top, chunk=chunk)
    ids = np.asarray([str(x) for x in gallery_ids], dtype=object)
    return dict(zip((str(q) for q in query_ids), ids[ranked.numpy()].tolist()))


# ----------------------------------------------------------------------------------------------
# submission validators

_MAX_LISTED = 10


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise SubmissionError(f"{what}: {len(problems)} problem(s) a test server would reject:\n  {shown}{more}")


def _check_list(value, n: int, label: str, known: set | None, problems: list[str]) -> bool:
    """Common checks: a list of exactly n distinct strings, all known gallery names (when given)."""
    if not isinstance(value, list):
        problems.append(f"{label}: expected a list, got {type(value).__name__}")
        return False
    if not all(isinstance(x, str) for x in value):
        bad = next(x for x in value if not isinstance(x, str))
        problems.append(f"{label}: entries must be strings, found {bad!r} ({type(bad).__name__})")
        return False
    if len(value) != n:
        problems.append(f"{label}: {len(value)} entries, expected exactly {n}")
        return False
    if len(set(value)) != n:
        dup = sorted({x for x in value if value.count(x) > 1})
        problems.append(f"{label}: repeated entries {dup[:5]}; the {n} entries must be distinct")
        return False
    if known is not None:
        unknown = [x for x in value if x not in known]
        if unknown:
            problems.append(f"{label}: unknown gallery names {unknown[:5]}")
            return False
    return True


def _check_keys(sub: Mapping, expected: list[str], header: dict, label: str, problems: list[str]) -> None:
    for key, val in header.items():
        if sub.get(key) != val:
            problems.append(f"{label}: {key!r} must be {val!r}, got {sub.get(key)!r}")
    present = set(sub) - set(header)
    missing = [k for k in expected if k not in present]
    extra = sorted(present - set(expected))
    if missing:
        problems.append(f"{label}: {len(missing)} queries missing, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{label}: {len(extra)} keys that are not query ids of this split, e.g. {extra[:5]}")


def cirr_file_problems(sub, queries: Sequence[Mapping], gallery_names: Iterable[str] | None = None,
                       top: int = CIRR_TOP, subset: bool = False) -> list[str]:
    """What the CIRR server would reject in cirr.json (`subset=False`) or subset_cirr.json (`subset=True`).

    `queries`: dicts with "pair_id", "reference_name", "group_members" (CIRRDataset(...).queries).
    `gallery_names`: the test1 gallery; when given, every name must belong to it. `top`: names per
    list of cirr.json (the server wants 50; only a toy gallery smaller than 51 images calls for fewer).
    """
    label = "subset_cirr.json" if subset else "cirr.json"
    if not isinstance(sub, Mapping):
        return [f"{label}: must be a JSON object (dict), got {type(sub).__name__}"]
    problems: list[str] = []
    known = None if gallery_names is None else set(gallery_names)
    keys = [str(q["pair_id"]) for q in queries]
    _check_keys(sub, keys, {"version": "rc2", "metric": "recall_subset" if subset else "recall"}, label, problems)
    n = CIRR_SUBSET_TOP if subset else top
    for key, query in zip(keys, queries):
        ref = query["reference_name"]
        if key in sub and _check_list(sub[key], n, f"{label} pair id {key}", known, problems):
            if ref in sub[key]:
                problems.append(f"{label} pair id {key}: holds the reference image {ref!r}")
            outside = [x for x in sub[key] if x not in query["group_members"]] if subset else []
            if outside:
                problems.append(f"{label} pair id {key}: {outside} are not members of the query's img_set")
    return problems


def circo_file_problems(sub, queries: Sequence[Mapping], gallery_ids: Iterable | None = None,
                        top: int = CIRCO_TOP) -> list[str]:
    """What the CIRCO server would reject in circo.json.

    `queries`: dicts with "query_id" (CIRCODataset(...).queries). `gallery_ids`: when given, every
    id must belong to the gallery.
    """
    if not isinstance(sub, Mapping):
        return [f"circo.json: must be a JSON object (dict), got {type(sub).__name__}"]
    problems: list[str] = []
    known = None if gallery_ids is None else {str(x) for x in gallery_ids}
    keys = [str(q["query_id"]) for q in queries]
    _check_keys(sub, keys, {}, "circo.json", problems)
    for key in keys:
        if key in sub:
            _check_list(sub[key], top, f"circo.json query id {key}", known, problems)
    return problems


def validate_cirr_submission(sub: Mapping, subset_sub: Mapping, queries: Sequence[Mapping],
                             gallery_names: Iterable[str] | None = None, top: int = CIRR_TOP) -> None:
    """Raise SubmissionError if cirr.json / subset_cirr.json would be rejected by the CIRR server
    (`cirr_file_problems` of both, every problem listed)."""
    names = None if gallery_names is None else list(gallery_names)
    problems = cirr_file_problems(sub, queries, names, top) + cirr_file_problems(subset_sub, queries, names, top, subset=True)
    _raise_if(problems, "CIRR submission")


def validate_circo_submission(sub: Mapping, queries: Sequence[Mapping],
                              gallery_ids: Iterable | None = None, top: int = CIRCO_TOP) -> None:
    """Raise SubmissionError if circo.json would be rejected by the CIRCO server (`circo_file_problems`)."""
    _raise_if(circo_file_problems(sub, queries, gallery_ids, top), "CIRCO submission")


# ----------------------------------------------------------------------------------------------
# the servers' limits beyond the lists

SERVER_MAX_BYTES = {"cirr": 5_000_000}  # the CIRR server's upload limit, 5 MB per file
SERVER_QUERIES = {"cirr": 4148, "circo": 800}  # queries of the official test splits (CIRR test1, CIRCO test)


def size_problems(benchmark: str, label: str, n_bytes: int) -> list[str]:
    """A file over its server's upload limit."""
    limit = SERVER_MAX_BYTES.get(benchmark)
    if limit is not None and n_bytes > limit:
        return [f"{label}: {n_bytes / 1e6:.2f} MB, over the {benchmark.upper()} server's upload limit of "
                f"{limit / 1e6:.0f} MB"]
    return []


def query_count_note(benchmark: str, n_queries: int) -> str | None:
    """A warning when the annotations hold another number of test queries than the official split (toy or
    partial annotations): the server scores the official queries and rejects a file without them."""
    want = SERVER_QUERIES.get(benchmark)
    if want is not None and n_queries != want:
        return (f"the {benchmark.upper()} test annotations here hold {n_queries:,} queries, the official split "
                f"{want:,}: a file made from them is for these annotations only; the server rejects it")
    return None
