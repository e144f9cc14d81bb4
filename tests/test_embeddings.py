"""The prototype embedding's class medoid (smallest median distance, the paper's) against a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noprop.embeddings import LabelEmbedding, median_medoid

D = 64


def _brute_force(points: np.ndarray) -> tuple[int, int, float]:
    """(median medoid, sum medoid, gap between the two smallest medians), float64 loops over every pair."""
    n = points.shape[0]
    medians, sums = [], []
    for j in range(n):
        distances = [float(np.sqrt(((points[j] - points[k]) ** 2).sum())) for k in range(n) if k != j]
        medians.append(float(np.median(distances)) if distances else 0.0)
        sums.append(sum(distances))
    ordered = sorted(medians)
    gap = ordered[1] - ordered[0] if n > 1 else float("inf")
    return int(np.argmin(medians)), int(np.argmin(sums)), gap


def _line_class(rng: np.random.Generator, positions: list[float]) -> np.ndarray:
    """Points at ``positions`` along a random unit direction, plus 1e-3 isotropic noise (breaks exact ties)."""
    direction = rng.standard_normal(D)
    direction /= np.linalg.norm(direction)
    offset = rng.standard_normal(D)
    points = offset + np.asarray(positions)[:, None] * direction + 1e-3 * rng.standard_normal((len(positions), D))
    return points[rng.permutation(len(positions))]


def _classes() -> list[np.ndarray]:
    """Classes where the median and the sum medoid differ by construction, plus random ones of both parities.

    On a line the sum medoid is the middle point; the median medoid (the mean of the 4th and 5th
    nearest of 8 others, for 9 points) the point at the centre of the densest group. Class 0:
    a group 0, 0.5, 1.0, 1.5, 1.9, 2.0 and three far points 20, 21, 22. Sum medoid: 1.9 (sum 62.0,
    next 62.1 at 2.0); median medoid: 1.0 (median 1.0, next 1.25 at 1.5). Class 1 (11 points, the
    5th and 6th nearest of 10): group 0, 0.3, 0.6, 1.2, 2.5, 2.6, 2.7 and far 30..33; sum medoid
    2.6, median medoid 1.2 (1.45, next 2.05). The last class pins the median of an even count
    as the mean of the two middle distances: -0.1, 0, 0.15, 1.0, 1.2 has the medoid 0.15 (0.55,
    next 0.575 at 0), while the lower of the two middle values (the 2nd nearest of 4) would pick 0.
    """
    rng = np.random.default_rng(0)
    return [
        _line_class(rng, [0.0, 0.5, 1.0, 1.5, 1.9, 2.0, 20.0, 21.0, 22.0]),
        _line_class(rng, [0.0, 0.3, 0.6, 1.2, 2.5, 2.6, 2.7, 30.0, 31.0, 32.0, 33.0]),
        rng.standard_normal((40, D)) * rng.uniform(0.5, 2.0, (40, 1)),  # 39 others: odd count of distances
        rng.standard_normal((23, D)) * rng.uniform(0.5, 2.0, (23, 1)),  # 22 others: even count
        rng.standard_normal((2, D)),
        rng.standard_normal((1, D)),
        _line_class(rng, [-0.1, 0.0, 0.15, 1.0, 1.2]),
    ]


def test_test_data_separates_the_median_medoid_from_the_sum_medoid():
    """The construction works: the two definitions pick different images, with no near-tie in the median."""
    classes = _classes()
    for c in (0, 1):
        median_index, sum_index, gap = _brute_force(classes[c])
        assert median_index != sum_index, c
        assert gap > 1e-2, c


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 256])
def test_median_medoid_matches_brute_force(chunk_rows):
    for c, points in enumerate(_classes()):
        expected, _, gap = _brute_force(points)
        assert gap > 1e-4 or len(points) <= 2, c  # a clear winner, so float32 distances cannot flip it (2 points tie: both take the first)
        assert median_medoid(torch.from_numpy(points).float(), chunk_rows) == expected, c


def test_prototypes_are_the_median_medoids_of_whole_classes_in_chunks(monkeypatch):
    """initialize_prototypes over interleaved labels, chunked (3 rows, fewer than any class of 9+), against brute force."""
    classes = _classes()
    images = np.concatenate(classes)
    labels = np.concatenate([np.full(len(points), c) for c, points in enumerate(classes)])
    order = np.random.default_rng(1).permutation(len(labels))
    images, labels = images[order], labels[order]
    blocks = []
    cdist = torch.cdist

    def recording_cdist(a, b, *args, **kwargs):
        blocks.append((a.shape[0], b.shape[0]))
        return cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", recording_cdist)
    embedding = LabelEmbedding("prototype", len(classes), D)
    embedding.initialize_prototypes(torch.from_numpy(images).float().reshape(-1, 1, 8, 8), torch.from_numpy(labels), chunk_rows=3)
    for c in range(len(classes)):
        members = images[labels == c]
        expected, sum_medoid, _ = _brute_force(members)
        torch.testing.assert_close(embedding.weight[c].detach(), torch.from_numpy(members[expected]).float(), rtol=0, atol=0)
        if c == 0:
            assert not torch.equal(embedding.weight[c].detach(), torch.from_numpy(members[sum_medoid]).float())
    assert max(rows for rows, _ in blocks) == 3  # never more than chunk_rows rows of distances at once
    assert max(columns for _, columns in blocks) == 40  # ... against the whole class (no sample of it)
    assert bool(embedding.initialized)


def test_medoid_rejects_a_bad_chunk_and_an_empty_class():
    with pytest.raises(ValueError, match="chunk_rows"):
        median_medoid(torch.zeros(3, 2), 0)
    embedding = LabelEmbedding("prototype", 3, 4)
    with pytest.raises(ValueError, match="class 2 has no training images"):
        embedding.initialize_prototypes(torch.zeros(4, 4), torch.tensor([0, 1, 0, 1]))
