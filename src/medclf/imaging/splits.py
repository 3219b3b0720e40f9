"""Patient-level, label-stratified, seeded splits (pure functions).

`assign_splits` stratifies single-label data by each group's majority label; `assign_splits_multilabel` stratifies
multi-label data (an N×L 0/1 matrix) by iterative stratification over whole groups (Sechidis, Tsoumakas, Vlahavas,
"On the Stratification of Multi-label Data", ECML PKDD 2011).
"""

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


def assign_splits_multilabel(
    groups: list[int],
    y: np.ndarray,
    fixed: list[str | None],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """Assign each record of a multi-label set (`y`: N×L 0/1, one row per record) a split, whole groups at a time.

    Records with a `fixed` split keep it; the splits missing from the fixed set are carved out of the
    unassigned/train pool with the sizes `assign_splits` gives them (`val_fraction`, `test_fraction` of all
    records). Iterative stratification (Sechidis et al. 2011) over the pool's groups: a group (patient) is one
    example weighing its number of images, its label vector the sum of its images' rows (images carrying each
    finding). Each split wants its share of the pool's images and of each finding's positives; the finding with
    the fewest groups still to place goes first, each of its groups to the split that still wants most of that
    finding (ties: most images still wanted, then the seeded generator), and the counts wanted are updated by
    every finding the group carries; the groups with no finding fill the images each split still wants. The
    result is deterministic for a seed, and a finding's positives spread over the splits close to the fractions.
    """
    n = len(groups)
    matrix = np.asarray(y)
    if matrix.ndim != 2 or len(matrix) != n:
        raise ValueError(f"y must be an N×L matrix with one row per record ({n}); got shape {matrix.shape}")
    present = {s for s in fixed if s}
    want = {s: f for s, f in (("test", test_fraction), ("val", val_fraction)) if s not in present and f > 0}
    out: list[str] = [s or "" for s in fixed]
    pool = [i for i in range(n) if out[i] in ("", "train")]
    if not want or not pool:
        return [s or "train" for s in out]
    by_group: dict[int, list[int]] = defaultdict(list)
    for i in pool:
        by_group[groups[i]].append(i)
    gids = sorted(by_group)
    sizes = np.array([len(by_group[g]) for g in gids], dtype=float)
    counts = np.stack([matrix[by_group[g]].sum(axis=0) for g in gids]).astype(float)  # groups × findings
    names = [*want, "train"]
    shares = [f * n / len(pool) for f in want.values()]
    ratio = np.array([*shares, max(0.0, 1.0 - sum(shares))])
    need_images = ratio * sizes.sum()
    need_labels = np.outer(ratio, counts.sum(axis=0))  # splits × findings
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(gids))  # the order groups are placed in (the seed's only other use: ties)
    placed = np.full(len(gids), -1)
    carries = counts > 0

    def best(scores: np.ndarray) -> int:
        top = np.flatnonzero(scores == scores.max())
        return int(top[0] if len(top) == 1 else rng.choice(top))

    while True:
        left = (carries & (placed < 0)[:, None]).sum(axis=0)
        if not left.any():
            break
        label = int(np.argmin(np.where(left > 0, left, np.iinfo(np.int64).max)))  # rarest; ties: first finding
        for g in order[carries[order, label] & (placed[order] < 0)]:
            wanted = need_labels[:, label]
            tied = np.flatnonzero(wanted == wanted.max())
            split = int(tied[0]) if len(tied) == 1 else int(tied[best(need_images[tied])])
            placed[g] = split
            need_labels[split] -= counts[g]
            need_images[split] -= sizes[g]
    for g in order[placed[order] < 0]:  # groups with no finding
        split = best(need_images)
        placed[g] = split
        need_images[split] -= sizes[g]
    for g, split in zip(gids, placed, strict=True):
        for i in by_group[g]:
            out[i] = names[split]
    return [s or "train" for s in out]


def label_counts(y: np.ndarray, splits: list[str], labels: list[str]) -> dict[str, dict[str, int]]:
    """Multi-label: per split (in `SPLITS` order), the images carrying each finding (`y`: N×L 0/1, `labels` its
    columns)."""
    matrix, where = np.asarray(y), np.asarray(splits)
    return {
        s: {c: int(v) for c, v in zip(labels, matrix[where == s].sum(axis=0, dtype=np.int64), strict=True)}
        for s in SPLITS
    }


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
