"""Which usable rows go into which split: the seeded selection, the mix of several sources, the
stratified split.

1. **How many rows of each source** (:func:`mix_targets`): ``num_samples`` exactly; the sources with a
   ``weight`` together form the largest mix with their shares that repeats none of their rows; a
   source with neither takes all its rows. ``max_samples`` then caps the total, keeping the shares.
2. **Split counts** (:func:`allocate_splits`): the total is split by the ratios (:func:`split_counts`),
   and validation and test are shared among the sources in proportion to their rows (largest
   remainder), so every split keeps each source's share within one row; training takes the rest.
3. **Rows** (:func:`select_source_rows`): each source's usable rows in a seeded permutation; without
   repetition the first rows go to training, then validation, then test. A source asked for more rows
   than it has gives each split its own share of distinct rows and draws the rest of that split from
   them again (with replacement), so no row is in two splits.

With one source and no repetition this is the plain seeded split (a permutation with ``split_seed``,
then training, validation, test in order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")


def split_counts(n: int, train_ratio: float, val_ratio: float, test_ratio: float) -> dict[str, int]:
    """Rows per split: floor for validation and test, the rest to train; a split whose ratio is
    above 0 gets at least one row while train keeps at least one."""
    del train_ratio  # train takes the rest
    counts = {"validation": math.floor(n * val_ratio + 1e-9), "test": math.floor(n * test_ratio + 1e-9)}
    for name, ratio in (("validation", val_ratio), ("test", test_ratio)):
        if ratio > 0 and counts[name] == 0 and n - sum(counts.values()) >= 2:
            counts[name] = 1
    return {"train": n - counts["validation"] - counts["test"], **counts}


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainder; ties go to the earlier share)."""
    weight = float(sum(shares))
    if total <= 0 or weight <= 0:
        return [0] * len(shares)
    quotas = [total * s / weight for s in shares]
    counts = [math.floor(q + 1e-9) for q in quotas]
    order = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_targets(
    sizes: Sequence[int],
    weights: Sequence[float | None],
    num_samples: Sequence[int | None],
    max_samples: int | None = None,
) -> list[int]:
    """Rows taken from each source (see the module notes)."""
    weighted = [i for i, w in enumerate(weights) if w is not None and num_samples[i] is None]
    total_weight = sum(float(weights[i]) for i in weighted)  # type: ignore[arg-type]
    scale = min((sizes[i] * total_weight / float(weights[i]) for i in weighted), default=0.0)  # type: ignore[arg-type]
    targets = []
    for i, size in enumerate(sizes):
        if num_samples[i] is not None:
            targets.append(int(num_samples[i]))  # type: ignore[arg-type]
        elif i in weighted:
            targets.append(min(size, math.floor(scale * float(weights[i]) / total_weight + 0.5)))  # type: ignore[arg-type]
        else:
            targets.append(size)
    if max_samples is not None and sum(targets) > max_samples:
        targets = apportion(max_samples, targets)
    return targets


def allocate_splits(targets: Sequence[int], ratios: tuple[float, float, float]) -> list[dict[str, int]]:
    """Rows of each source in each split; the totals are ``split_counts`` of the whole mix."""
    totals = split_counts(sum(targets), *ratios)
    val = apportion(totals["validation"], targets)
    test = apportion(totals["test"], targets)
    allocation = []
    for i, target in enumerate(targets):
        v, t = val[i], test[i]
        while v + t > target:  # only for sources of a row or two
            if t >= v and t:
                t -= 1
            else:
                v -= 1
        allocation.append({"train": target - v - t, "validation": v, "test": t})
    return allocation


def permutation(n: int, seed: int, source_index: int) -> np.ndarray:
    """The seeded order of a source's usable rows (the first source: ``datasets``' shuffle with ``seed``)."""
    rng = np.random.default_rng(seed if source_index == 0 else [seed, source_index])
    return rng.permutation(n)


def select_source_rows(
    n: int, counts: dict[str, int], seed: int, source_index: int
) -> tuple[dict[str, np.ndarray], bool]:
    """Usable-row indices of one source per split, and whether rows were repeated."""
    order = permutation(n, seed, source_index)
    wanted = sum(counts.values())
    if wanted <= n:
        chosen, start = {}, 0
        for name in SPLITS:
            chosen[name] = order[start : start + counts[name]]
            start += counts[name]
        return chosen, False
    # more rows wanted than the source has: each split gets its own distinct rows, then repeats them
    distinct = apportion(n, [counts[name] for name in SPLITS])
    for k, name in enumerate(SPLITS):
        if counts[name] and not distinct[k]:
            donor = max(range(len(SPLITS)), key=lambda j: distinct[j])
            if distinct[donor] > 1:
                distinct[donor] -= 1
                distinct[k] = 1
    rng = np.random.default_rng([seed, source_index, 7])
    chosen, start = {}, 0
    for k, name in enumerate(SPLITS):
        pool = order[start : start + distinct[k]]
        start += distinct[k]
        if counts[name] and not len(pool):  # a source of fewer rows than non-empty splits
            pool = order[: max(distinct[0], 1)]
        reps = max(counts[name] - len(pool), 0)
        extra = rng.choice(pool, size=reps, replace=True) if reps else np.empty(0, dtype=order.dtype)
        chosen[name] = np.concatenate([pool[: counts[name]], extra])
    return chosen, True


def shuffle_split(indices: np.ndarray, seed: int, split_index: int) -> np.ndarray:
    """A split's rows of several sources (or with repeats) in a seeded order."""
    return np.random.default_rng([seed, 1000 + split_index]).permutation(indices)
