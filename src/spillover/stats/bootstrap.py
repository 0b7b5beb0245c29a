"""Paired, seeded, vectorised bootstrap of cell sums.

A replicate is a resample of the paired items (base and aligned predictions
travel together). Items are resampled within each cell, or whole templates
(``question_index`` within a category) are resampled within each category.
Each replicate is reduced to per-cell sums of the same statistics the point
estimates use, so every row of a comparison gets its replicates by adding cells.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ClusterUnit = Literal["item", "template"]

_CHUNK_ELEMENTS = 4_000_000
"""Largest index block drawn at once (bounds memory to tens of MB)."""


def bootstrap_cell_sums(
    stats: np.ndarray,
    item_cell: np.ndarray,
    n_cells: int,
    *,
    replicates: int,
    seed: int,
    cluster: ClusterUnit = "item",
    item_group: np.ndarray | None = None,
    item_cluster: np.ndarray | None = None,
) -> np.ndarray:
    """Bootstrap replicates of per-cell sums.

    Args:
        stats: ``(n_items, F)`` integer statistics per item.
        item_cell: Cell index of each item (``0..n_cells-1``).
        n_cells: Number of cells.
        replicates: Number of bootstrap replicates ``B``.
        seed: Seed of ``numpy.random.default_rng``.
        cluster: ``item`` resamples items with replacement within each cell;
            ``template`` resamples clusters with replacement within each group.
        item_group: Resampling group of each item (``template`` only; the category).
        item_cluster: Cluster of each item (``template`` only; the template id).

    Returns:
        ``(B, n_cells, F)`` float array of per-cell sums in each replicate.

    Notes:
        Item resampling within a cell is drawn as multinomial counts over the
        distinct rows of ``stats`` in that cell (weighted by their frequency),
        which has exactly the distribution of drawing the cell's items with
        replacement and costs ``O(B * patterns)``. Template resampling draws
        cluster indices (``O(B * clusters)``); those draws depend only on the seed
        and the cluster counts, so swapping the two runs of a comparison reuses
        the same resamples and negates every bootstrapped difference exactly.

    References:
        Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13
        (percentile intervals); Davison & Hinkley, "Bootstrap Methods and their
        Application" (1997), section 3.8 (resampling clusters).
    """
    rng = np.random.default_rng(seed)
    n_feat = stats.shape[1]
    out = np.zeros((replicates, n_cells, n_feat), dtype=float)
    if cluster == "item":
        for cell in range(n_cells):
            members = np.flatnonzero(item_cell == cell)
            if members.size == 0:
                continue
            # Drawing n items with replacement is the same as drawing multinomial counts over
            # the distinct per-item statistic patterns (a few dozen per cell), weighted by how
            # many items share each pattern: O(B * patterns) instead of O(B * n).
            patterns, weights = _patterns(stats[members])
            draws = rng.multinomial(members.size, weights / members.size, size=replicates)
            out[:, cell, :] = draws @ patterns.astype(float)
        return out
    if item_group is None or item_cluster is None:
        raise ValueError("template resampling needs item_group and item_cluster")
    for group in np.unique(item_group):
        in_group = np.flatnonzero(item_group == group)
        clusters, cl_index = np.unique(item_cluster[in_group], return_inverse=True)
        cells, cell_index = np.unique(item_cell[in_group], return_inverse=True)
        # per-cluster, per-cell sums: (K, C, F)
        per = np.zeros((len(clusters), len(cells), n_feat), dtype=float)
        np.add.at(per, (cl_index, cell_index), stats[in_group].astype(float))
        counts = _resample_counts(rng, len(clusters), replicates)
        out[:, cells, :] += np.einsum("bk,kcf->bcf", counts, per)
    return out


def _patterns(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a small non-negative integer matrix, and how often each occurs."""
    dims = tuple(int(v) + 1 for v in rows.max(axis=0))
    if rows.min() < 0 or float(np.prod(dims, dtype=float)) >= 2.0**62:
        uniq, counts = np.unique(rows, axis=0, return_counts=True)
        return uniq, counts
    codes = np.ravel_multi_index(tuple(rows.T), dims)
    _, first, counts = np.unique(codes, return_index=True, return_counts=True)
    return rows[first], counts


def _resample_counts(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """``(B, n)`` counts of how often each of ``n`` units is drawn in each replicate."""
    counts = np.zeros((replicates, n), dtype=float)
    if n == 0:
        return counts
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, replicates, step):
        stop = min(replicates, start + step)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=np.int64)
        flat = idx + (np.arange(stop - start, dtype=np.int64) * n)[:, None]
        counts[start:stop] = np.bincount(flat.ravel(), minlength=(stop - start) * n).reshape(
            stop - start, n
        )
    return counts


def percentile_interval(
    values: np.ndarray, confidence: float
) -> tuple[float | None, float | None, int]:
    """Percentile interval of replicates, ignoring undefined (NaN) ones.

    Returns:
        ``(low, high, n_undefined)``; ``(None, None, n)`` when no replicate is defined.

    Notes:
        The limits are the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
        quantiles of the defined replicates (numpy's linear interpolation).

    References:
        Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13.
    """
    finite = values[~np.isnan(values)]
    n_undefined = int(values.size - finite.size)
    if finite.size == 0:
        return None, None, n_undefined
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [tail, 1.0 - tail])
    return float(lo), float(hi), n_undefined
