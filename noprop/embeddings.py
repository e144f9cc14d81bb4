"""Class-label embeddings ``W_embed [C, D]``: the targets ``u_y = W_embed[y]`` the blocks denoise towards.

* ``onehot``: the fixed identity, ``D = C``.
* ``learned``: a trained matrix, ``D = 20`` by default, orthogonally initialised.
* ``prototype``: a trained matrix with ``D`` = the image size, initialised to one real training
  image per class, the class medoid as the paper defines it: the image with the smallest median
  Euclidean distance to the other images of its class (:func:`median_medoid`, over the whole
  class, with the distances computed a block of rows at a time so memory stays bounded).
"""

from __future__ import annotations

import torch
from torch import nn

from noprop.validation import check_choice, check_labels, check_positive_int

EMBEDDINGS = ("onehot", "learned", "prototype")
DEFAULT_LEARNED_DIM = 20
MEDOID_CHUNK_ROWS = 256  # rows of a class's pairwise-distance matrix held at once


def median_medoid(points: torch.Tensor, chunk_rows: int = MEDOID_CHUNK_ROWS) -> int:
    """Index of the point with the smallest median Euclidean distance to the other points.

    ``argmin_j median_{k != j} ||x_j - x_k||`` over ``points [n, d]`` (floating), where the median
    of an even number of distances is the mean of the two middle ones; the first index on ties;
    0 when ``n = 1``. The ``[n, n]`` distance matrix is never held whole: ``chunk_rows`` rows at
    a time, a float32 ``[chunk_rows, n]`` block and its sorted copy (with int64 indices), about
    ``16 * chunk_rows * n`` bytes (25 MB for a 6,000-image MNIST class at the default 256 rows),
    plus the ``[n]`` medians. Time ``O(n^2 d)``.
    """
    n = points.shape[0]
    check_positive_int("chunk_rows", chunk_rows)
    if n == 1:
        return 0
    points, others = points.float(), n - 1
    medians = points.new_empty(n)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        distances = torch.cdist(points[start:stop], points)  # [stop - start, n]
        local = torch.arange(stop - start, device=points.device)
        distances[local, start + local] = float("inf")  # a point's distance to itself: sorted last, left out
        ordered = distances.sort(dim=1).values
        medians[start:stop] = (ordered[:, (others - 1) // 2] + ordered[:, others // 2]) / 2
    return int(medians.argmin())


class LabelEmbedding(nn.Module):
    """The embedding matrix ``weight [C, D]`` of one of the kinds in :data:`EMBEDDINGS`.

    Args:
        kind: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        num_classes: ``C``.
        dim: ``D``; must be ``C`` (or None) for onehot, defaults to 20 for learned, and is
            required (the flattened image size) for prototype.
    """

    def __init__(self, kind: str, num_classes: int, dim: int | None = None):
        super().__init__()
        self.kind = check_choice("embedding", kind, EMBEDDINGS)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if kind == "onehot":
            if dim not in (None, num_classes):
                raise ValueError(f"embedding_dim: a one-hot embedding has dim = num_classes = {num_classes}, got {dim}")
            self.register_buffer("weight", torch.eye(num_classes))
        elif kind == "learned":
            dim = check_positive_int("embedding_dim", DEFAULT_LEARNED_DIM if dim is None else dim)
            weight = torch.empty(num_classes, dim)
            nn.init.orthogonal_(weight)
            self.weight = nn.Parameter(weight)
        else:
            if dim is None:
                raise ValueError("embedding_dim: a prototype embedding needs dim = the flattened image size")
            dim = check_positive_int("embedding_dim", dim)
            self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.tensor(kind != "prototype"))
        self._known_ready = kind != "prototype"  # caches ``initialized`` so the check never syncs twice

    @property
    def dim(self) -> int:
        """The embedding dimension ``D``."""
        return self.weight.shape[1]

    @property
    def learnable(self) -> bool:
        """True if the embedding is trained (learned, prototype)."""
        return isinstance(self.weight, nn.Parameter)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``u_y = weight[y]``: ``y [B]`` -> ``[B, D]``."""
        return self.weight[y]

    @torch.no_grad()
    def initialize_prototypes(self, images: torch.Tensor, labels: torch.Tensor, chunk_rows: int = MEDOID_CHUNK_ROWS) -> None:
        """Set each class row to the medoid of that class's training images (prototype kind only).

        Args:
            images: ``[N, *image_shape]`` training images, preprocessed as the model sees them.
            labels: ``[N]`` class labels.
            chunk_rows: rows of a class's distance matrix computed at once (memory: see :func:`median_medoid`).

        The medoid of class ``c`` (the paper's) is ``argmin_j median_{k != j} ||x_j - x_k||`` over
        all images of class ``c`` (:func:`median_medoid`).
        """
        if self.kind != "prototype":
            raise ValueError(f"initialize_prototypes: only a prototype embedding has prototypes, this one is {self.kind!r}")
        labels = check_labels("labels", labels, self.num_classes, images.shape[0])
        flat = images.reshape(images.shape[0], -1).float()
        if flat.shape[1] != self.dim:
            raise ValueError(f"images: expected {self.dim} values per image (the embedding dim), got {flat.shape[1]}")
        for c in range(self.num_classes):
            members = flat[labels == c]
            if members.shape[0] == 0:
                raise ValueError(f"labels: class {c} has no training images, so it has no prototype")
            self.weight[c] = members[median_medoid(members, chunk_rows)].to(self.weight.device)
        self.initialized.fill_(True)

    def check_ready(self) -> None:
        """Raise if a prototype embedding was never initialised from data (reads the flag once)."""
        if self._known_ready:
            return
        if not bool(self.initialized):
            raise RuntimeError(
                "prototype embedding: call model.embedding.initialize_prototypes(images, labels) before training"
            )
        self._known_ready = True

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_classes={self.num_classes}, dim={self.dim}"
