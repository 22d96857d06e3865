"""Retrieval metrics and test-server submission files for FashionIQ, CIRR and CIRCO (METHOD §10-12).

Pure functions of tensors and lists of names; no I/O. Features are L2-normalised by the caller, so
the similarity is the dot product `query @ gallery.T`. Rankings come from `torch.topk` on query
chunks, so memory stays at `chunk x G` similarities and no full sort of the gallery is ever made.
All percentages are in [0, 100].
"""
from __future__ import annotations

from dataclasses import dataclass
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
    hits = fashioniq_hits(query_feats, gallery_feats, gallery_names, target_names, ks, chunk)
    return {k: _percent(hit) for k, hit in hits.items()}


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
    hits = cirr_hits(query_feats, gallery_feats, gallery_names, reference_names, target_names, group_members, ks,
                     subset_ks, chunk)
    return {key: _percent(hit) for key, hit in hits.items()}


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


# the semantic aspects the CIRCO server reports mAP@10 for, in its order
CIRCO_ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change",
                 "comparative_statement", "statement_with_conjunction", "spatial_relations_background", "viewpoint")


def circo_aspect_map10(ap10: torch.Tensor, aspects: Sequence[Sequence[str]]) -> dict[str, float]:
    """mAP@10 in percent per semantic aspect, as the CIRCO server reports it: the mean AP@10 (from
    `circo_per_query`) of the queries that list the aspect. Keys `circo_map_at10_<aspect>`, the server's
    aspects in its order first, others after, each only where some query lists it."""
    _check_rows(ap10.shape[0], aspects=aspects)
    seen = {a for row in aspects for a in row}
    order = [a for a in CIRCO_ASPECTS if a in seen] + sorted(seen - set(CIRCO_ASPECTS))
    out = {}
    for a in order:
        rows = torch.tensor([a in row for row in aspects])
        out[f"circo_map_at10_{a}"] = float(ap10[rows].mean().item() * 100.0)
    return out


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

# where each rule comes from: a server's own code or instructions, or this repository's convention
CIRCO_SERVER = "the CIRCO server's code, miccunifi/CIRCO src/evaluation.py"
CIRCO_README = "CIRCO's submission instructions, miccunifi/CIRCO README"
CIRR_DOC = "CIRR's server instructions, Cuberick-Orion/CIRR Test-split_server.md"
CIRR_CONVENTION = "a convention here: the CIRR server's checks are not public"
CIRCO_CONVENTION = "a convention here: the CIRCO server does not check it"


@dataclass(frozen=True)
class Finding:
    """One thing a submission check found: `rejects` when a server rejects it (its code or its documents say
    so), else a note on a convention; `source` says which."""

    text: str
    source: str
    rejects: bool

    def __str__(self) -> str:
        return f"{self.text} ({self.source})"


def _raise_if(problems: list, what: str) -> None:
    if problems:
        shown = "\n  ".join(map(str, problems[:_MAX_LISTED]))
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise SubmissionError(f"{what}: {len(problems)} problem(s) a test server would reject:\n  {shown}{more}")


def _check_keys(sub: Mapping, expected: list[str], header: dict, label: str, source: str, extra_source: str,
                out: list[Finding]) -> None:
    for key, val in header.items():
        if sub.get(key) != val:
            out.append(Finding(f"{label}: {key!r} must be {val!r}, got {sub.get(key)!r}", source, True))
    present = set(sub) - set(header)
    missing = [k for k in expected if k not in present]
    extra = sorted(present - set(expected))
    if missing:
        out.append(Finding(f"{label}: {len(missing)} queries missing, e.g. {missing[:5]}", source, True))
    if extra:
        out.append(Finding(f"{label}: {len(extra)} keys that are not query ids of this split, e.g. {extra[:5]}",
                           extra_source, extra_source == source))


def _repeated(values: list) -> list:
    seen, dup = set(), []
    for x in values:
        if x in seen and x not in dup:
            dup.append(x)
        seen.add(x)
    return dup


def cirr_file_findings(sub, queries: Sequence[Mapping], gallery_names: Iterable[str] | None = None,
                       top: int = CIRR_TOP, subset: bool = False) -> list[Finding]:
    """Everything the CIRR checks find in cirr.json (`subset=False`) or subset_cirr.json (`subset=True`).

    Rejected, as CIRR's server instructions state: not one JSON object; `"version"` other than `"rc2"`;
    `"metric"` other than `"recall"` / `"recall_subset"`; a test query's `pair_id` missing; a list that is
    not `top` (50) or 3 image names, given as strings without the `.png` of the files. Notes, since the
    server's own checks are not public: keys that are not query ids, a name listed twice, the reference in
    its own list, subset names outside the query's `img_set`, names outside the gallery.
    `queries`: dicts with "pair_id", "reference_name", "group_members" (CIRRDataset(...).queries).
    """
    label = "subset_cirr.json" if subset else "cirr.json"
    if not isinstance(sub, Mapping):
        return [Finding(f"{label}: must be a JSON object (dict), got {type(sub).__name__}", CIRR_DOC, True)]
    out: list[Finding] = []
    known = None if gallery_names is None else set(gallery_names)
    keys = [str(q["pair_id"]) for q in queries]
    header = {"version": "rc2", "metric": "recall_subset" if subset else "recall"}
    _check_keys(sub, keys, header, label, CIRR_DOC, CIRR_CONVENTION, out)
    n = CIRR_SUBSET_TOP if subset else top
    for key, query in zip(keys, queries):
        if key not in sub:
            continue
        value, where = sub[key], f"{label} pair id {key}"
        if not isinstance(value, list):
            out.append(Finding(f"{where}: expected a list, got {type(value).__name__}", CIRR_DOC, True))
            continue
        bad = [x for x in value if not isinstance(x, str)]
        if bad:
            out.append(Finding(f"{where}: entries must be strings, found {bad[0]!r} ({type(bad[0]).__name__})",
                               CIRR_DOC, True))
            continue
        if len(value) != n:
            out.append(Finding(f"{where}: {len(value)} entries, expected exactly {n}", CIRR_DOC, True))
        files = [x for x in value if x.lower().endswith(".png")]
        if files:
            out.append(Finding(f"{where}: image names are given without '.png', found {files[:3]}", CIRR_DOC, True))
        dup = _repeated(value)
        if dup:
            out.append(Finding(f"{where}: repeated entries {dup[:5]}; the entries must be distinct", CIRR_CONVENTION,
                               False))
        if query["reference_name"] in value:
            out.append(Finding(f"{where}: holds the reference image {query['reference_name']!r}", CIRR_CONVENTION,
                               False))
        outside = [x for x in value if x not in query["group_members"]] if subset else []
        if outside:
            out.append(Finding(f"{where}: {outside} are not members of the query's img_set", CIRR_CONVENTION, False))
        unknown = [] if known is None else [x for x in value if x not in known]
        if unknown:
            out.append(Finding(f"{where}: unknown gallery names {unknown[:5]}", CIRR_CONVENTION, False))
    return out


def _circo_id(x) -> int | None:
    """The id the CIRCO server reads from a list entry (it converts the list with numpy to int): None for an
    entry it cannot read."""
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return int(x) if np.isfinite(x) else None
    if isinstance(x, str):
        try:
            return int(x)
        except ValueError:
            return None
    return None


def circo_file_findings(sub, queries: Sequence[Mapping], gallery_ids: Iterable | None = None,
                        top: int = CIRCO_TOP) -> list[Finding]:
    """Everything the CIRCO checks find in circo.json.

    Rejected, as the server's code does: not one JSON object; query ids missing or keys that are not the
    split's query ids (it wants exactly the ids 0..n-1); an entry numpy cannot read as an integer id (the
    server takes ints and numeric strings alike); an id listed twice; and, as CIRCO's instructions state, a
    list of other than the top `top` (50). Notes: a float id (the server truncates it), the same image as an
    int and a string, an id outside the gallery. `queries`: dicts with "query_id" (CIRCODataset(...).queries).
    """
    if not isinstance(sub, Mapping):
        return [Finding(f"circo.json: must be a JSON object (dict), got {type(sub).__name__}", CIRCO_SERVER, True)]
    out: list[Finding] = []
    known = None if gallery_ids is None else {i for i in map(_circo_id, gallery_ids) if i is not None}
    keys = [str(q["query_id"]) for q in queries]
    _check_keys(sub, keys, {}, "circo.json", CIRCO_SERVER, CIRCO_SERVER, out)
    for key in keys:
        if key not in sub:
            continue
        value, where = sub[key], f"circo.json query id {key}"
        if not isinstance(value, list):
            out.append(Finding(f"{where}: expected a list, got {type(value).__name__}", CIRCO_SERVER, True))
            continue
        ids = [_circo_id(x) for x in value]
        unreadable = [x for x, i in zip(value, ids) if i is None]
        if unreadable:
            out.append(Finding(f"{where}: entries must be integer ids or numeric strings, found {unreadable[0]!r}",
                               CIRCO_SERVER, True))
            continue
        if len(value) != top:
            out.append(Finding(f"{where}: {len(value)} entries, expected exactly {top}", CIRCO_README, True))
        dup = _repeated(value)
        if dup:
            out.append(Finding(f"{where}: repeated entries {dup[:5]}; the ids must be distinct", CIRCO_SERVER, True))
        elif len(set(ids)) != len(ids):
            out.append(Finding(f"{where}: repeated entries {_repeated(ids)[:5]} written once as a number and once as a "
                               "string; the server counts such an image twice", CIRCO_CONVENTION, False))
        floats = [x for x in value if isinstance(x, float)]
        if floats:
            out.append(Finding(f"{where}: float ids {floats[:3]}; the server truncates them to integers",
                               CIRCO_CONVENTION, False))
        unknown = [] if known is None else [x for x, i in zip(value, ids) if i not in known]
        if unknown:
            out.append(Finding(f"{where}: unknown gallery names {unknown[:5]}", CIRCO_CONVENTION, False))
    return out


def cirr_file_problems(sub, queries: Sequence[Mapping], gallery_names: Iterable[str] | None = None,
                       top: int = CIRR_TOP, subset: bool = False) -> list[Finding]:
    """What the CIRR server rejects in the file (`cirr_file_findings` that reject)."""
    return [f for f in cirr_file_findings(sub, queries, gallery_names, top, subset) if f.rejects]


def circo_file_problems(sub, queries: Sequence[Mapping], gallery_ids: Iterable | None = None,
                        top: int = CIRCO_TOP) -> list[Finding]:
    """What the CIRCO server rejects in circo.json (`circo_file_findings` that reject)."""
    return [f for f in circo_file_findings(sub, queries, gallery_ids, top) if f.rejects]


def validate_cirr_submission(sub: Mapping, subset_sub: Mapping, queries: Sequence[Mapping],
                             gallery_names: Iterable[str] | None = None, top: int = CIRR_TOP) -> None:
    """Raise SubmissionError listing every finding, notes included, in cirr.json / subset_cirr.json: the
    check of the files this repository writes, which keep the conventions too."""
    names = None if gallery_names is None else list(gallery_names)
    found = cirr_file_findings(sub, queries, names, top) + cirr_file_findings(subset_sub, queries, names, top, subset=True)
    _raise_if(found, "CIRR submission")


def validate_circo_submission(sub: Mapping, queries: Sequence[Mapping],
                              gallery_ids: Iterable | None = None, top: int = CIRCO_TOP) -> None:
    """Raise SubmissionError listing every finding, notes included, in circo.json (the files this
    repository writes keep the conventions too)."""
    _raise_if(circo_file_findings(sub, queries, gallery_ids, top), "CIRCO submission")


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
                f"{want:,}: files are checked against these annotations, and the server expects the official queries")
    return None


# ----------------------------------------------------------------------------------------------
# per-query hits (for standard errors over queries): their means are the recalls above

def fashioniq_hits(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_names: Sequence[str],
                   target_names: Sequence[str], ks: Iterable[int] = (10, 50),
                   chunk: int = DEFAULT_CHUNK) -> dict[int, torch.Tensor]:
    """Per query, whether its target is in the top K (bool [Q]) for one FashionIQ category, reference kept:
    `fashioniq_recall` is 100 x the mean of each."""
    ks = tuple(ks)
    _check_rows(query_feats.shape[0], target_names=target_names)
    if len(gallery_names) != gallery_feats.shape[0]:
        raise MetricsError(f"{len(gallery_names)} gallery names for {gallery_feats.shape[0]} gallery features")
    target = _index_of(target_names, _lookup(gallery_names), "target names")
    hit = topk_indices(query_feats, gallery_feats, max(ks), chunk=chunk) == target[:, None]
    return {k: hit[:, :k].any(dim=1) for k in ks}


def cirr_hits(query_feats: torch.Tensor, gallery_feats: torch.Tensor, gallery_names: Sequence[str],
              reference_names: Sequence[str], target_names: Sequence[str],
              group_members: Sequence[Sequence[str]], ks: Iterable[int] = (1, 5, 10, 50),
              subset_ks: Iterable[int] = (1, 2, 3), chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """Per query, whether its target is in the top K of the gallery and of its set (bool [Q]), reference
    removed, keyed as `cirr_recall`, which is 100 x the mean of each."""
    ks, subset_ks = tuple(ks), tuple(subset_ks)
    _check_rows(query_feats.shape[0], reference_names=reference_names, target_names=target_names,
                group_members=group_members)
    if len(gallery_names) != gallery_feats.shape[0]:
        raise MetricsError(f"{len(gallery_names)} gallery names for {gallery_feats.shape[0]} gallery features")
    lookup = _lookup(gallery_names)
    ref = _index_of(reference_names, lookup, "reference names")
    target = _index_of(target_names, lookup, "target names")
    members = _member_index(group_members, lookup)
    q, g = _prepare(query_feats, gallery_feats)
    top, sub = _cirr_rankings(q, g, ref, members, max(ks), max(subset_ks), chunk)
    hit, sub_hit = top == target[:, None], sub == target[:, None]
    out = {f"cirr_recall_at{k}": hit[:, :k].any(dim=1) for k in ks}
    out.update({f"cirr_group_recall_at{k}": sub_hit[:, :k].any(dim=1) for k in subset_ks})
    return out
