"""Metrics against brute-force per-query references (full sort) and hand-computed cases;
submission files and their validators."""
from __future__ import annotations

import math

import pytest
import torch

from metrics import (circo_map_recall, circo_per_query, circo_submission, cirr_recall, cirr_submission,
                     fashioniq_recall, topk_indices, validate_circo_submission, validate_cirr_submission)


def _feats(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _ranking(q, g, i):
    """Brute force: the full gallery ordering for query i, best first (Python sort)."""
    sims = (g @ q[i]).tolist()
    return sorted(range(len(sims)), key=lambda j: -sims[j])


def _onehot_gallery(n):
    """Gallery of n orthonormal vectors: with a query built by _query_with, sims are exactly chosen."""
    return torch.eye(n, dtype=torch.float64)


def _query_with(sims):
    """A query whose similarity to gallery item j (of _onehot_gallery) is sims[j]."""
    return torch.tensor([sims], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# topk_indices

def test_topk_matches_full_sort_with_and_without_exclusion():
    q, g = _feats(37, 16, 0), _feats(90, 16, 1)
    exclude = torch.randint(-1, 90, (37,), generator=torch.Generator().manual_seed(2))
    plain = topk_indices(q, g, 12, chunk=5)  # several chunks, last one partial
    masked = topk_indices(q, g, 12, exclude=exclude, chunk=8)
    for i in range(37):
        full = _ranking(q, g, i)
        assert plain[i].tolist() == full[:12]
        expected = [j for j in full if j != int(exclude[i])][:12]
        assert masked[i].tolist() == expected


def test_topk_rejects_k_beyond_gallery():
    q, g = _feats(2, 4, 0), _feats(5, 4, 1)
    with pytest.raises(ValueError, match="between 1 and 4"):
        topk_indices(q, g, 5, exclude=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="feature sizes differ"):
        topk_indices(q, _feats(5, 3, 1), 2)


# ---------------------------------------------------------------------------------------------
# FashionIQ

def test_fashioniq_recall_matches_brute_force():
    q, g = _feats(40, 8, 3), _feats(120, 8, 4)
    names = [f"img{j}" for j in range(120)]
    gen = torch.Generator().manual_seed(5)
    targets = [names[int(t)] for t in torch.randint(0, 120, (40,), generator=gen)]
    # make some targets easy so both hit and miss occur
    for i in range(0, 40, 3):
        targets[i] = names[_ranking(q, g, i)[i % 15]]
    got = fashioniq_recall(q, g, names, targets, ks=(10, 50), chunk=7)
    for k in (10, 50):
        hits = [targets[i] in [names[j] for j in _ranking(q, g, i)[:k]] for i in range(40)]
        assert got[k] == pytest.approx(100.0 * sum(hits) / 40)
    assert 0 < got[10] < 100


def test_fashioniq_reference_not_removed_by_hand():
    # 60 items; the query is most similar to item 0 (its own reference, say) and the target is
    # item 10, ranked 11th -> not in the top 10, in the top 50.
    sims = [1.0 - 0.01 * j for j in range(60)]
    names = [str(j) for j in range(60)]
    got = fashioniq_recall(_query_with(sims), _onehot_gallery(60), names, ["10"])
    assert got == {10: 0.0, 50: 100.0}
    got = fashioniq_recall(_query_with(sims), _onehot_gallery(60), names, ["9"])  # 10th: a hit
    assert got == {10: 100.0, 50: 100.0}


def test_fashioniq_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="not in the gallery"):
        fashioniq_recall(_feats(1, 4, 0), _feats(60, 4, 1), [str(j) for j in range(60)], ["nope"])


# ---------------------------------------------------------------------------------------------
# CIRR

def _cirr_case(n_q=30, n_g=80, seed=7):
    q, g = _feats(n_q, 8, seed), _feats(n_g, 8, seed + 1)
    names = [f"dev-{j}" for j in range(n_g)]
    gen = torch.Generator().manual_seed(seed + 2)
    refs, targets, members = [], [], []
    for i in range(n_q):
        six = torch.randperm(n_g, generator=gen)[:6].tolist()
        members.append([names[j] for j in six])
        refs.append(names[six[int(torch.randint(0, 6, (1,), generator=gen))]])
        others = [names[j] for j in six if names[j] != refs[-1]]
        targets.append(others[i % 5])
    return q, g, names, refs, targets, members


def test_cirr_recall_matches_brute_force():
    q, g, names, refs, targets, members = _cirr_case()
    got = cirr_recall(q, g, names, refs, targets, members, chunk=4)
    rank_full, rank_sub = [], []
    for i in range(len(refs)):
        order = [names[j] for j in _ranking(q, g, i) if names[j] != refs[i]]
        rank_full.append(order.index(targets[i]))
        sub = [n for n in order if n in members[i]]
        assert len(sub) == 5
        rank_sub.append(sub.index(targets[i]))
    for k in (1, 5, 10, 50):
        assert got[f"cirr_recall_at{k}"] == pytest.approx(100.0 * sum(r < k for r in rank_full) / len(refs))
    for k in (1, 2, 3):
        assert got[f"cirr_group_recall_at{k}"] == pytest.approx(100.0 * sum(r < k for r in rank_sub) / len(refs))
    assert set(got) == {"cirr_recall_at1", "cirr_recall_at5", "cirr_recall_at10", "cirr_recall_at50",
                        "cirr_group_recall_at1", "cirr_group_recall_at2", "cirr_group_recall_at3"}
    assert 0 < got["cirr_group_recall_at2"] < 100


def test_cirr_reference_removed_by_hand():
    # The reference (item 0) is the most similar; the target (item 3) is 4th overall, 3rd once the
    # reference is removed. Members: 0 (ref), 1, 3, 7, 8, 9 -> subset order 1, 3, ... target 2nd.
    sims = [1.0 - 0.01 * j for j in range(60)]
    names = [str(j) for j in range(60)]
    got = cirr_recall(_query_with(sims), _onehot_gallery(60), names, ["0"], ["3"],
                      [["0", "1", "3", "7", "8", "9"]], ks=(1, 3, 5), subset_ks=(1, 2, 3))
    assert got == {"cirr_recall_at1": 0.0, "cirr_recall_at3": 100.0, "cirr_recall_at5": 100.0,
                   "cirr_group_recall_at1": 0.0, "cirr_group_recall_at2": 100.0, "cirr_group_recall_at3": 100.0}
    # Not removed, the target would be 4th and R@3 would miss: removal is what makes R@3 a hit.
    got = cirr_recall(_query_with(sims), _onehot_gallery(60), names, ["59"], ["3"],
                      [["59", "1", "3", "7", "8", "9"]], ks=(3,), subset_ks=(1,))
    assert got["cirr_recall_at3"] == 0.0


def test_cirr_submission_and_validator():
    q, g, names, refs, _, members = _cirr_case(n_q=6, n_g=70)
    pair_ids = [100 + i for i in range(6)]
    full, subset = cirr_submission(q, g, names, refs, members, pair_ids, chunk=4)
    assert full["version"] == "rc2" and full["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    for i, pid in enumerate(pair_ids):
        order = [names[j] for j in _ranking(q, g, i) if names[j] != refs[i]]
        assert full[str(pid)] == order[:50]
        assert subset[str(pid)] == [n for n in order if n in members[i]][:3]
    queries = [{"pair_id": p, "reference_name": r, "group_members": m} for p, r, m in zip(pair_ids, refs, members)]
    validate_cirr_submission(full, subset, queries, gallery_names=names)  # a good file passes


def _bad_cirr_cases():
    q, g, names, refs, _, members = _cirr_case(n_q=4, n_g=70)
    pair_ids = [1, 2, 3, 4]
    full, subset = cirr_submission(q, g, names, refs, members, pair_ids)
    queries = [{"pair_id": p, "reference_name": r, "group_members": m} for p, r, m in zip(pair_ids, refs, members)]
    outside = next(n for n in names if n not in members[0])
    cases = {
        "missing query": ({k: v for k, v in full.items() if k != "2"}, subset, "1 queries missing"),
        "49 names": ({**full, "1": full["1"][:49]}, subset, "49 entries, expected exactly 50"),
        "repeated name": ({**full, "1": full["1"][:49] + full["1"][:1]}, subset, "repeated entries"),
        "reference inside": ({**full, "1": full["1"][:49] + [refs[0]]}, subset, "holds the reference image"),
        "unknown name": ({**full, "1": full["1"][:49] + ["dev-nope"]}, subset, "unknown gallery names"),
        "wrong metric": ({**full, "metric": "recall_subset"}, subset, "'metric' must be 'recall'"),
        "int entries": ({**full, "1": [1] * 50}, subset, "must be strings"),
        "subset size": (full, {**subset, "3": subset["3"][:2]}, "2 entries, expected exactly 3"),
        "subset outside members": (full, {**subset, "1": subset["1"][:2] + [outside]}, "not members"),
        "subset reference": (full, {**subset, "1": subset["1"][:2] + [refs[0]]}, "holds the reference"),
        "extra key": ({**full, "999": full["1"]}, subset, "not query ids"),
    }
    return queries, names, cases


@pytest.mark.parametrize("case", ["missing query", "49 names", "repeated name", "reference inside", "unknown name",
                                  "wrong metric", "int entries", "subset size", "subset outside members",
                                  "subset reference", "extra key"])
def test_cirr_validator_rejects(case):
    queries, names, cases = _bad_cirr_cases()
    full, subset, message = cases[case]
    with pytest.raises(ValueError, match=message):
        validate_cirr_submission(full, subset, queries, gallery_names=names)


# ---------------------------------------------------------------------------------------------
# CIRCO

def _ap_reference(order, gts, k):
    """AP@k by the definition, with a plain loop."""
    hits, total = 0, 0.0
    for j, x in enumerate(order[:k], start=1):
        if x in gts:
            hits += 1
            total += hits / j
    return total / min(len(gts), k)


def _circo_case(n_q: int, n_g: int, seeds: tuple[int, int, int], max_gt: int, pool: int, pad: int = 0):
    """(queries, gallery, gallery ids, gt ids): each query's 1..max_gt-1 ground truths drawn from its own
    top `pool`, so they often fall inside the top 50; `pad`: filled up with "" to that length, as the
    authors' files are."""
    q, g = _feats(n_q, 8, seeds[0]), _feats(n_g, 8, seeds[1])
    ids = [str(1000 + j) for j in range(n_g)]
    gen = torch.Generator().manual_seed(seeds[2])
    gt_ids = []
    for i in range(n_q):
        order = [ids[j] for j in _ranking(q, g, i)]
        n = int(torch.randint(1, max_gt, (1,), generator=gen))
        gts = [order[p] for p in torch.randperm(pool, generator=gen)[:n].tolist()]
        gt_ids.append(gts + [""] * (pad - n))
    return q, g, ids, gt_ids


def test_circo_map_recall_matches_brute_force():
    n_q = 25
    q, g, ids, gt_ids = _circo_case(n_q, 150, (11, 12, 13), max_gt=8, pool=60, pad=23)
    got = circo_map_recall(q, g, ids, gt_ids, chunk=6)
    for k in (5, 10, 25, 50):
        aps, rec = [], []
        for i in range(n_q):
            order = [ids[j] for j in _ranking(q, g, i)]
            gts = [x for x in gt_ids[i] if x]
            aps.append(_ap_reference(order, gts, k))
            rec.append(gts[0] in order[:k])
        assert got[f"circo_map_at{k}"] == pytest.approx(100.0 * sum(aps) / n_q, rel=1e-5)
        assert got[f"circo_recall_at{k}"] == pytest.approx(100.0 * sum(rec) / n_q)
    assert 0 < got["circo_map_at5"] < 100


def test_circo_by_hand():
    # Gallery 60, ranking = item order. Query A: GTs at ranks 1, 3, 10 (target = rank 3).
    #   AP@5 = (1/1 + 2/3) / min(3, 5) = (5/3)/3 = 5/9
    #   AP@10 = (1 + 2/3 + 3/10) / 3 = 59/90; recall@5 of the target (rank 3) = 1.
    # Query B: one GT at rank 7: AP@5 = 0, AP@10 = (1/7)/1; recall@5 = 0, recall@10 = 1.
    sims = [1.0 - 0.01 * j for j in range(60)]
    ids = [str(j) for j in range(60)]
    q = torch.cat([_query_with(sims), _query_with(sims)])
    gts = [["2", "0", "9", ""], ["6"]]
    got = circo_map_recall(q, _onehot_gallery(60), ids, gts, ks=(5, 10))
    assert got["circo_map_at5"] == pytest.approx(100 * (5 / 9 + 0) / 2)
    assert got["circo_map_at10"] == pytest.approx(100 * (59 / 90 + 1 / 7) / 2)
    assert got["circo_recall_at5"] == pytest.approx(50.0)
    assert got["circo_recall_at10"] == pytest.approx(100.0)


def test_circo_reference_not_removed_and_ids_as_int():
    # The reference (item 0) is not removed: the target at rank 2 stays rank 2, AP@5 = (1/2)/1.
    sims = [1.0 - 0.01 * j for j in range(60)]
    got = circo_map_recall(_query_with(sims), _onehot_gallery(60), list(range(60)), [[1]], ks=(5,))
    assert got["circo_map_at5"] == pytest.approx(50.0)
    assert got["circo_recall_at5"] == 100.0


def test_circo_submission_and_validator():
    q, g = _feats(5, 8, 21), _feats(80, 8, 22)
    ids = list(range(500, 580))  # ints in, strings out
    sub = circo_submission(q, g, ids, [0, 1, 2, 3, 4], chunk=2)
    assert set(sub) == {"0", "1", "2", "3", "4"}
    for i in range(5):
        assert sub[str(i)] == [str(ids[j]) for j in _ranking(q, g, i)[:50]]
    queries = [{"query_id": i} for i in range(5)]
    validate_circo_submission(sub, queries, gallery_ids=ids)
    bad = {
        "1 queries missing": {k: v for k, v in sub.items() if k != "3"},
        "51 entries": {**sub, "0": sub["0"] + [next(str(x) for x in ids if str(x) not in sub["0"])]},
        "repeated entries": {**sub, "0": sub["0"][:49] + sub["0"][:1]},
        "unknown gallery names": {**sub, "0": sub["0"][:49] + ["123"]},
        "integer ids or numeric strings": {**sub, "0": sub["0"][:49] + ["id-7"]},
        "not query ids": {**sub, "77": sub["0"]},
    }
    for message, bad_sub in bad.items():
        with pytest.raises(ValueError, match=message):
            validate_circo_submission(bad_sub, queries, gallery_ids=ids)
    validate_circo_submission({k: [int(x) for x in v] for k, v in sub.items()}, queries, gallery_ids=ids)  # ints too


def test_validator_lists_every_problem():
    sub = {str(i): ["a"] * 50 for i in range(12)}
    with pytest.raises(ValueError) as err:
        validate_circo_submission(sub, [{"query_id": i} for i in range(12)])
    assert "12 problem(s)" in str(err.value) and "and 2 more" in str(err.value)


def test_half_precision_features_on_cpu():
    q, g = _feats(4, 8, 31), _feats(60, 8, 32)
    got = topk_indices(q.half(), g.half(), 3)
    assert got.shape == (4, 3) and got.dtype == torch.long
    assert not math.isnan(fashioniq_recall(q.half(), g.half(), [str(j) for j in range(60)], ["1"] * 4)[10])


def test_circo_small_gallery_ranks_everything():
    # 3 gallery images < 50: the ranking is the whole gallery, as slicing a sorted list gives
    g = torch.eye(3)
    q = torch.tensor([[0.1, 0.9, 0.0]])
    out = circo_map_recall(q, g, ["a", "b", "c"], [["b", "c"]])
    # ranking b, a, c: AP@5 = (1/1 + 2/3) / 2
    assert out["circo_map_at5"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["circo_recall_at5"] == 100.0


def test_submissions_of_a_toy_gallery_smaller_than_the_server_lists():
    torch.manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    names = [f"n{i}" for i in range(8)]
    queries = [{"pair_id": 1, "reference_name": "n0", "group_members": names[:6]},
               {"pair_id": 2, "reference_name": "n3", "group_members": names[2:8]}]
    sub, subset = cirr_submission(q, g, names, ["n0", "n3"], [x["group_members"] for x in queries], [1, 2], top=7)
    validate_cirr_submission(sub, subset, queries, gallery_names=names, top=7)
    assert sorted(sub["1"]) == sorted(set(names) - {"n0"})  # every other image, best first
    order = sorted((n for n in names if n != "n0"), key=lambda n: -float(q[0] @ g[int(n[1:])]))
    assert sub["1"] == order
    with pytest.raises(ValueError, match="7 entries, expected exactly 50"):
        validate_cirr_submission(sub, subset, queries, gallery_names=names)  # the server's 50
    ids = [100 + i for i in range(8)]  # CIRCO's gallery ids are COCO image ids
    circo = circo_submission(q, g, ids, [5, 6], top=8)
    validate_circo_submission(circo, [{"query_id": 5}, {"query_id": 6}], gallery_ids=ids, top=8)
    assert len(circo["5"]) == 8


def test_circo_per_query_values_are_each_querys_ap_and_hit():
    n_q = 12
    q, g, ids, gt_ids = _circo_case(n_q, 80, (21, 22, 23), max_gt=6, pool=40)
    per_query = circo_per_query(q, g, ids, gt_ids, ks=(5, 25))
    assert list(per_query) == ["circo_map_at5", "circo_map_at25", "circo_recall_at5", "circo_recall_at25"]
    for i in range(n_q):
        order = [ids[j] for j in _ranking(q, g, i)]
        for k in (5, 25):
            assert float(per_query[f"circo_map_at{k}"][i]) == pytest.approx(_ap_reference(order, gt_ids[i], k), rel=1e-6)
            assert float(per_query[f"circo_recall_at{k}"][i]) == float(gt_ids[i][0] in order[:k])
    assert 0 < float(per_query["circo_map_at25"].sum()) < n_q  # neither all misses nor all perfect
    means = circo_map_recall(q, g, ids, gt_ids, ks=(5, 25))
    assert means == {key: pytest.approx(100.0 * float(v.mean())) for key, v in per_query.items()}
