"""Recall per kind of change on the toy world: which attributes differ between a query's reference and its
target (their records in toy_manifest.json), and Recall@K over the queries of each kind.

Grouping: one row per attribute, counting every query whose target differs from its reference in that
attribute (a query that changes colour and shape counts in both rows, so the rows overlap), then one row
per number of attributes changed ("1 change", "2 changes", "3+ changes", which partition the queries), then
"all". Scene attributes: colour, shape, size (the object's), pattern and background (the background's
pattern and colour); garment attributes: colour, pattern, print, variant (the cut), fit.

Pure functions of the manifest's records and each query's ranked gallery names; the demo feeds them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

# where and on what canvas an image is drawn, not what it shows: never a kind of change
LAYOUT_FIELDS = frozenset({"canvas", "center", "kind"})
KS = (1, 5, 10)
MANY = 3  # "3+ changes" gathers every query that changes at least this many attributes


def changed_attributes(reference: Mapping, target: Mapping) -> tuple[str, ...]:
    """The attributes whose values differ between two image records, in the reference record's order."""
    return tuple(k for k in reference if k not in LAYOUT_FIELDS and reference[k] != target.get(k))


def records(manifest: dict, benchmark: str, category: str | None = None) -> dict:
    """Image name -> attribute record of one benchmark's images (FashionIQ: of one category)."""
    images = manifest["images"]
    if benchmark == "fashioniq":
        return images["FashionIQ"][category]
    return images[{"cirr": "CIRR", "circo": "CIRCO"}[benchmark]]


def query_changes(queries: Sequence[Mapping], recs: Mapping) -> list[tuple[str, ...]]:
    """Each query's changed attributes (its reference_name's record against its target_name's)."""
    missing = sorted({n for q in queries for n in (q["reference_name"], q["target_name"]) if n not in recs})
    if missing:
        raise ValueError(f"toy_manifest.json has no record of {len(missing)} query images (e.g. {missing[0]}): "
                       "the data folder is not the toy world the manifest describes; rerun scripts/make_toy_data.py")
    return [changed_attributes(recs[q["reference_name"]], recs[q["target_name"]]) for q in queries]


def kind_rows(changes: Sequence[Sequence[str]]) -> dict[str, list[int]]:
    """Row label -> indices of its queries: one row per attribute changed anywhere (in order of first
    appearance), one per number of changes, and "all"."""
    rows: dict[str, list[int]] = {}
    for i, ch in enumerate(changes):
        for a in ch:
            rows.setdefault(a, []).append(i)
    counts: dict[str, list[int]] = {}
    for i, ch in enumerate(changes):
        counts.setdefault(min(len(ch), MANY), []).append(i)
    labels = {0: "no change", 1: "1 change", **{n: f"{n} changes" for n in range(2, MANY)}, MANY: f"{MANY}+ changes"}
    rows.update({labels[n]: counts[n] for n in sorted(counts)})
    rows["all"] = list(range(len(changes)))
    return rows


def recall_by_kind(ranked: Sequence[Sequence[str]], targets: Sequence[str], changes: Sequence[Sequence[str]],
                   ks: Sequence[int] = KS) -> dict[str, dict]:
    """Row label -> {"queries": n, "recall_at{K}": percent of its queries whose target is among the first K
    names of its ranking}. A ranking shorter than K (a small gallery) counts over all its names."""
    if not len(ranked) == len(targets) == len(changes):
        raise ValueError(f"{len(ranked)} rankings, {len(targets)} targets and {len(changes)} change lists differ in number")
    position = [list(r).index(t) if t in r else None for r, t in zip(ranked, targets)]
    out = {}
    for label, rows in kind_rows(changes).items():
        entry = {"queries": len(rows)}
        for k in ks:
            hits = sum(position[i] is not None and position[i] < k for i in rows)
            entry[f"recall_at{k}"] = 100.0 * hits / len(rows)
        out[label] = entry
    return out


def format_kind_table(title: str, table: Mapping[str, Mapping[str, dict]], ks: Sequence[int] = KS) -> str:
    """One benchmark's rows (method -> label -> entry) as text: the query count, then R@K for each method."""
    methods = list(table)
    labels = list(next(iter(table.values())))
    head = " ".join(f"{'@' + str(k):>6}" for k in ks)
    lines = [title, f"  {'':<14}{'':>8}" + "".join(f"  {m:^{len(head)}}" for m in methods),
             f"  {'change':<14}{'queries':>8}" + "".join(f"  {head}" for _ in methods)]
    for label in labels:
        cells = [" ".join(f"{table[m][label][f'recall_at{k}']:6.1f}" for k in ks) for m in methods]
        lines.append(f"  {label:<14}{table[methods[0]][label]['queries']:>8}" + "".join(f"  {c}" for c in cells))
    return "\n".join(lines)
