"""The shape of an annotation file's entries: a schema says which keys each entry must have and the type
of each value, and `check_entries` names the first entry that does not fit (datasets.py's readers);
`check_inside` refuses image paths that lead outside the dataset's folders; `report_queries` counts the
queries a benchmark keeps although they are odd (an empty caption, a target equal to the reference)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from errors import UserError
from logs import get_logger

log = get_logger("annotations")


class AnnotationFormatError(UserError, ValueError):
    """An annotation file exists but does not hold what the benchmark's format says."""


# Schemas of annotation entries: a dict maps each required key to the type of its value (a tuple: any
# of them; a one-element list: a list of that type; a dict: a nested object). NONEMPTY: a non-empty string.
NONEMPTY = "non-empty string"
_TYPE_NAMES = {str: "a string", int: "an integer", NONEMPTY: "a non-empty string"}


def _type_problem(value, kind, where: str) -> str | None:
    """Why `value` does not have the type `kind` (None when it does)."""
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            return f"{where or 'it'} is not a JSON object"
        for key, sub in kind.items():
            name = f"{where}.{key}" if where else key
            if key not in value:
                return f"lacks [{name!r}]"
            problem = _type_problem(value[key], sub, name)
            if problem:
                return problem
        return None
    if isinstance(kind, list):
        if not isinstance(value, list):
            return f"has {where!r} = {str(value)[:60]}, not a list"
        bad = next((v for v in value if _type_problem(v, kind[0], where)), None)
        return None if bad is None else f"has {where!r} holding {bad!r}, not {_type_names(kind[0])}"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k == NONEMPTY and isinstance(value, str) and value.strip():
            return None
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if k is str and isinstance(value, str):
            return None
    return f"has {where!r} = {value!r}, not {_type_names(kind)}"


def _type_names(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, str(k)) for k in kinds)


def check_entries(entries: Any, schema: dict, path: Path, unique: str | None = None) -> None:
    """Every entry of a list annotation must match `schema`; `unique`: a key no two entries share."""
    if not isinstance(entries, list):
        raise AnnotationFormatError(f"{path}: expected a JSON list, got {type(entries).__name__}")
    seen: dict = {}
    for i, e in enumerate(entries):
        problem = _type_problem(e, schema, "")
        if problem:
            raise AnnotationFormatError(f"{path}: entry {i} {problem}: {str(e)[:200]}")
        if unique is not None:
            key = str(e[unique])
            if key in seen:
                raise AnnotationFormatError(f"{path}: entries {seen[key]} and {i} have the same {unique} {e[unique]!r}; "
                                            f"each {unique} must appear once (fix or re-download the file)")
            seen[key] = i


def leaves_folder(rel: str) -> bool:
    """Whether the relative path `rel` of an annotation file leads outside the folder it is joined to: an
    absolute path, or more `..` than folders before them. Judged on the string alone: a symbolic link
    inside the folder that points elsewhere is the user's own layout."""
    if rel.startswith("/"):
        return True
    if ".." not in rel:  # most names: no parent step at all
        return False
    depth = 0
    for part in rel.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def check_inside(rel_paths, folder: Path, path: Path) -> None:
    """Each (entry, relative path) of the annotation file `path` must stay under `folder` (`leaves_folder`);
    the first that does not is named."""
    for entry, rel in rel_paths:
        if leaves_folder(rel):
            raise AnnotationFormatError(f"{path}: entry {entry} names the image {rel!r}, which lies outside {folder}; "
                                        "image paths in annotation files are relative to the dataset's folders and "
                                        "stay inside them (fix or re-download the file)")


_reported: set[str] = set()  # a split read again (training's validation each epoch) is reported once


def report_queries(label: str, files, queries) -> None:
    """One warning line for a split whose queries include an empty relative caption or a target that is
    the reference image itself (both kept: the benchmarks' files are scored as published), with the counts;
    once per process for the same split and counts."""
    empty = sum(any(not t.strip() for t in q.get("relative_captions") or (q["relative_caption"],)) for q in queries)
    same = sum(q.get("target_name") == q["reference_name"] for q in queries)
    found = ([f"{empty} with an empty relative caption"] if empty else []) + \
        ([f"{same} whose target is the reference image"] if same else [])
    line = f"{label}: {' and '.join(found)}, of {len(queries)} queries ({', '.join(map(str, files))})"
    if found and line not in _reported:
        _reported.add(line)
        log.warning(line)
