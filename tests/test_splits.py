"""Unit tests for medclf.imaging.splits: grouping (patients + exact duplicates) and the seeded, stratified split.

Pure functions, so every expected number is computed by hand. Besides guarding the README's "no patient and
no exact duplicate crosses splits" claim, these are the tests `make mutate` runs against splits.py.
"""

from __future__ import annotations

from collections import Counter

import pytest

from medclf.imaging.splits import SPLITS, assign_splits, link_groups


# ----------------------------------------------------------------------------- link_groups
def test_records_sharing_any_key_form_one_group_named_by_its_first_record() -> None:
    keys = [
        ["p1", "h1"],
        ["p2", "h2"],
        ["p3", "h1"],  # p3 is a copy of p1's image: one group with p1
        ["p4", "h4"],
        ["p2", "h9"],
        ["p5", "h9"],
    ]  # p5 shares an image with p2's second record
    assert link_groups(keys) == [0, 1, 0, 3, 1, 1]


def test_a_later_record_merges_two_existing_groups_transitively() -> None:
    # records 0 and 1 start apart; record 2 carries both keys, record 4 links 3 to them through "c"
    assert link_groups([["a"], ["b"], ["b", "a"], ["c"], ["c", "b"], ["d"]]) == [0, 0, 0, 0, 0, 5]
    # a long chain merged from the far end (exercises path compression on a deep tree)
    n = 30
    chain = [[f"k{i}"] for i in range(n)] + [[f"k{i}", f"k{i + 1}"] for i in reversed(range(n - 1))]
    assert link_groups(chain) == [0] * (2 * n - 1)
    assert link_groups([]) == []


# ----------------------------------------------------------------------------- assign_splits
def _records(n_a: int, n_b: int) -> tuple[list[int], list[str]]:
    """n_a records labelled A then n_b labelled B, each its own group."""
    return list(range(n_a + n_b)), ["A"] * n_a + ["B"] * n_b


def test_fractions_are_exact_per_label_and_every_record_gets_a_split() -> None:
    groups, labels = _records(60, 40)
    out = assign_splits(groups, labels, [None] * 100, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert set(out) <= set(SPLITS)
    # per label: test quota 0.1 x size, val quota 0.2 x size, filled group by group
    assert Counter(zip(out, labels, strict=True)) == {
        ("test", "A"): 6,
        ("val", "A"): 12,
        ("train", "A"): 42,
        ("test", "B"): 4,
        ("val", "B"): 8,
        ("train", "B"): 28,
    }
    again = assign_splits(groups, labels, [None] * 100, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert again == out  # seeded
    other = assign_splits(groups, labels, [None] * 100, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert other != out and Counter(other) == Counter(out)


def test_official_splits_are_kept_and_missing_ones_are_carved_as_a_share_of_the_whole() -> None:
    groups, labels = _records(50, 50)
    fixed: list[str | None] = ["test"] * 10 + [None] * 40 + ["test"] * 10 + [None] * 40
    out = assign_splits(groups, labels, fixed, val_fraction=0.2, test_fraction=0.15, seed=0)
    assert [out[i] for i in range(100) if fixed[i]] == ["test"] * 20  # official test kept as is
    assert Counter(out[i] for i in range(100) if not fixed[i]) == {"val": 20, "train": 60}  # no extra test
    # val is 20% of all 100 records, not of the 80 left in the pool: 0.2 x 40 x 100/80 = 10 per label
    pairs = Counter(zip(out, labels, strict=True))
    assert pairs[("val", "A")] == pairs[("val", "B")] == 10


def test_records_fixed_to_train_are_part_of_the_pool() -> None:
    groups, labels = _records(60, 40)
    out = assign_splits(groups, labels, ["train"] * 100, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert Counter(out) == {"train": 70, "val": 20, "test": 10}
    none = assign_splits(groups, labels, ["train"] * 100, val_fraction=0.0, test_fraction=0.1, seed=3)
    assert Counter(none) == {"train": 90, "test": 10}  # val_fraction 0: no validation split


def test_whole_groups_move_together_and_fixed_val_is_respected() -> None:
    # 12 patients with 1..3 images each, labels by patient; patient 0's images are fixed to val
    groups, labels, fixed = [], [], []
    for g in range(12):
        for _ in range(1 + g % 3):
            groups.append(g)
            labels.append("A" if g % 2 else "B")
            fixed.append("val" if g == 0 else None)
    out = assign_splits(groups, labels, fixed, val_fraction=0.2, test_fraction=0.2, seed=5)
    for g in set(groups):
        assert len({s for s, gg in zip(out, groups, strict=True) if gg == g}) == 1, g
    assert {s for s, gg in zip(out, groups, strict=True) if gg == 0} == {"val"}
    assert "val" not in [s for s, gg in zip(out, groups, strict=True) if gg != 0]  # val present: not carved again
    assert "test" in out


@pytest.mark.parametrize("seed", range(5))
def test_a_group_is_stratified_by_its_majority_label(seed: int) -> None:
    # one 3-image patient labelled B, A, A (majority A, although B sorts first) plus 10 single B records:
    # alone in stratum A, the patient always meets stratum A's test quota. Stratified by any other label
    # it would compete with the B records and mostly land in train.
    groups = [0, 0, 0, *range(1, 11)]
    labels = ["B", "A", "A", *["B"] * 10]
    out = assign_splits(groups, labels, [None] * 13, val_fraction=0.0, test_fraction=0.1, seed=seed)
    assert out[:3] == ["test"] * 3
    assert out[3:].count("test") == 1  # stratum B: quota 0.1 x 10 = 1
    # a tie (one A, one B) goes to the label that sorts first
    tie = assign_splits([0, 0, *range(1, 11)], ["B", "A", *["B"] * 10], [None] * 12, 0.0, 0.1, seed)
    assert tie[:2] == ["test"] * 2
