"""Recall per kind of change (scripts/toy/kinds.py) on a hand-made manifest and hand-made rankings."""
from __future__ import annotations

import pytest

from toy import kinds

RECORDS = {
    "a": {"colour": "red", "shape": "circle", "size": "small", "canvas": [96, 96], "center": [40, 40]},
    "b": {"colour": "green", "shape": "circle", "size": "small", "canvas": [120, 96], "center": [50, 41]},
    "c": {"colour": "green", "shape": "square", "size": "large", "canvas": [96, 96], "center": [40, 40]},
    "d": {"colour": "red", "shape": "triangle", "size": "small", "canvas": [96, 96], "center": [40, 40]},
}
QUERIES = [{"reference_name": "a", "target_name": "b"}, {"reference_name": "b", "target_name": "c"},
           {"reference_name": "c", "target_name": "d"}, {"reference_name": "d", "target_name": "a"}]
FILL = [f"e{i}" for i in range(10)]


def _ranking(target: str | None, position: int | None) -> list[str]:
    names = FILL[:10]
    if target is not None:
        names = names[:position] + [target] + names[position:9]
    return names


def test_changed_attributes_ignore_the_layout():
    assert kinds.changed_attributes(RECORDS["a"], RECORDS["b"]) == ("colour",)  # canvas and center differ too
    assert kinds.query_changes(QUERIES, RECORDS) == [("colour",), ("shape", "size"), ("colour", "shape", "size"), ("shape",)]
    with pytest.raises(ValueError, match="no record of 1 query images"):
        kinds.query_changes([{"reference_name": "a", "target_name": "z"}], RECORDS)


def test_recall_by_kind_on_hand_made_rankings():
    # targets at ranks 1, 3, 7 and beyond 10
    ranked = [_ranking("b", 0), _ranking("c", 2), _ranking("d", 6), _ranking(None, None)]
    assert [r.index(t) if t in r else None for r, t in zip(ranked, "bcda")] == [0, 2, 6, None]
    table = kinds.recall_by_kind(ranked, list("bcda"), kinds.query_changes(QUERIES, RECORDS))
    third = 100 / 3
    expected = {"colour": (2, 50, 50, 100), "shape": (3, 0, third, 2 * third), "size": (2, 0, 50, 100),
                "1 change": (2, 50, 50, 50), "2 changes": (1, 0, 100, 100), "3+ changes": (1, 0, 0, 100),
                "all": (4, 25, 50, 75)}
    assert list(table) == list(expected)
    for label, (n, r1, r5, r10) in expected.items():
        assert table[label] == pytest.approx({"queries": n, "recall_at1": r1, "recall_at5": r5, "recall_at10": r10}), label


def test_short_rankings_and_unchanged_queries():
    # a gallery of three: R@5 and R@10 count over the whole ranking; a query that changes nothing has its own row
    changes = [(), ("pattern",)]
    table = kinds.recall_by_kind([["x", "y", "t"], ["t", "x", "y"]], ["t", "t"], changes)
    assert list(table) == ["pattern", "no change", "1 change", "all"]
    assert table["no change"] == {"queries": 1, "recall_at1": 0.0, "recall_at5": 100.0, "recall_at10": 100.0}
    assert table["all"]["recall_at1"] == 50.0
    with pytest.raises(ValueError, match="differ in number"):
        kinds.recall_by_kind([["t"]], ["t", "t"], changes)


def test_kind_table_text():
    table = kinds.recall_by_kind([["t", "x"]], ["t"], [("colour",)])
    text = kinds.format_kind_table("T", {"fti4cir": table, "text-only": table})
    lines = text.splitlines()
    assert lines[0] == "T" and "fti4cir" in lines[1] and "text-only" in lines[1]
    assert lines[3].split() == ["colour", "1", "100.0", "100.0", "100.0", "100.0", "100.0", "100.0"]
    assert [line.split()[0] for line in lines[3:]] == ["colour", "1", "all"]
