"""Patient-level, label-stratified, seeded splits (pure functions)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

SPLITS = ("train", "val", "test")


def link_groups(keys: list[list[str]]) -> list[int]:
    """Union-find over records: records sharing any key (patient, exact hash) form one group.

    Grouping by image hash as well as patient keeps exact duplicates in one split,
    so a duplicated file can never leak from train into test.
    """
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            if k in first:
                a, b = find(i), find(first[k])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[k] = i
    return [find(i) for i in range(len(keys))]


def assign_splits(
    groups: list[int], labels: list[str], fixed: list[str | None], val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """Assign each record a split.

    Records with a `fixed` split keep it. Splits missing from the fixed set are
    carved out of the unassigned/train pool, whole groups at a time, stratified by
    each group's majority label so prevalence stays close across splits.
    """
    n = len(groups)
    present = {s for s in fixed if s}
    want = {s: f for s, f in (("test", test_fraction), ("val", val_fraction)) if s not in present and f > 0}
    out: list[str] = [s or "" for s in fixed]
    pool = [i for i in range(n) if out[i] in ("", "train")]
    by_group: dict[int, list[int]] = defaultdict(list)
    for i in pool:
        by_group[groups[i]].append(i)
    strata: dict[str, list[int]] = defaultdict(list)
    for g, members in by_group.items():
        labs = [labels[i] for i in members]
        strata[max(sorted(set(labs)), key=labs.count)].append(g)
    rng = np.random.default_rng(seed)
    total_pool = len(pool)
    for label in sorted(strata):
        gs = sorted(strata[label])
        rng.shuffle(gs)
        size = sum(len(by_group[g]) for g in gs)
        quota = {s: f * size * (total_pool and n / total_pool) for s, f in want.items()}
        filled = {s: 0 for s in want}
        for g in gs:
            target = next((s for s in ("test", "val") if s in want and filled[s] < quota[s]), "train")
            for i in by_group[g]:
                out[i] = target
            if target != "train":
                filled[target] += len(by_group[g])
    return [s or "train" for s in out]


def empty_split_problem(
    splits: list[str], groups: list[int], val_fraction: float, test_fraction: float, use_official: bool
) -> str | None:
    """Why these splits cannot be trained on (one of train, val, test is empty), or None.

    Names the patients (groups of linked images: a patient, or an image without a patient id with its exact
    duplicates) and images of every split, and the fractions that carved them.
    """
    empty = [s for s in SPLITS if s not in splits]
    if not empty:
        return None
    per = {s: (len({g for g, t in zip(groups, splits, strict=True) if t == s}), splits.count(s)) for s in SPLITS}
    counts = ", ".join(f"{s} {p} patients / {n} images" for s, (p, n) in per.items())
    names = " and ".join(f"the {s} split" for s in empty)
    return (
        f"{names} {'is' if len(empty) == 1 else 'are'} empty: {len(set(groups))} patients, {len(splits)} "
        f"images were split as {counts} (ingest.splits.val_fraction={val_fraction:g}, "
        f"test_fraction={test_fraction:g}, use_official={str(use_official).lower()}; whole patients are "
        "assigned per class, so a source with this few patients cannot fill every split). Add patients, or "
        "give the source official train/val/test folders"
    )
