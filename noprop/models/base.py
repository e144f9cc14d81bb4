"""What every model shares: configuration, the label embedding, input checks, seeds, ``loss``."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from noprop import rng
from noprop.blocks import BlockConfig, feature_map_size
from noprop.embeddings import LabelEmbedding
from noprop.objectives import LossTerms
from noprop import backends
from noprop.stacked_layers import set_backend
from noprop.user_blocks import UserBlock, build_blocks, check_factory, factory_name
from noprop.validation import check_choice, check_images, check_labels, check_positive_int


class StepSeeds(NamedTuple):
    """The seeds of one training step, drawn once (:meth:`NoPropModel.draw_step_seeds`) and shared by
    every chunk of blocks and every rank: ``noise`` (the noised latents), ``dropout`` (the masks)."""

    noise: torch.Tensor
    dropout: torch.Tensor


class BatchRows(NamedTuple):
    """Where a batch sits in a larger one: rows ``offset .. offset + B`` of a batch of ``total`` rows.

    A data-parallel rank passes it to ``loss_terms`` so that its rows get the noise, times and
    dropout masks they get in the whole batch.
    """

    offset: int
    total: int


class NoPropModel(nn.Module):
    """Base class of the NoProp models and the back-propagation baseline.

    Args:
        num_classes: number of classes ``C``.
        in_channels: image channels (1 for MNIST, 3 for CIFAR).
        image_size: image height = width (28 for MNIST, 32 for CIFAR; at least 8).
        embedding: ``"onehot"``, ``"learned"`` or ``"prototype"``.
        embedding_dim: ``D`` (see :class:`noprop.embeddings.LabelEmbedding`); a prototype
            embedding always has the image size.
        width: multiplier of the paper's layer widths (``BlockConfig.scaled``).
        backend: the backend of every op the model runs, :func:`noprop.ops.stacked_linear` (the
            stacked layers of ``BlockStack``) included: ``"auto"`` or a registered backend
            (``"reference"``, ``"triton"``, ``"extension"``; :mod:`noprop.backends`). An op the
            backend lacks runs on the reference (the extension has no ``stacked_linear``).
            Setting ``model.backend`` later reaches every layer too.
        block: a block factory in place of the paper's block (None): a callable, usually an
            ``nn.Module`` class, that the model calls with keyword arguments (``num_classes``,
            ``in_channels``, ``image_size``, ``embed_dim``, ``config``, ``prototype``,
            ``time_conditioned``: those its signature names) to build each block. The contract,
            the optional ``image``/``head`` split and how such a model is rebuilt from a checkpoint:
            :mod:`noprop.user_blocks`; examples: :mod:`noprop.zoo`.

    Subclasses implement :meth:`loss_terms` and :meth:`predict`, and a model whose inference has a
    choice of solver lists them in :attr:`solvers` with its :attr:`default_solver`.
    """

    method: str = ""
    solvers: tuple[str, ...] = ()  # the ``solver`` values ``predict`` accepts; empty: it has no choice
    default_solver: str | None = None  # what ``solver=None`` means

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        width: float = 1.0,
        backend: str = "auto",
        block: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        self.block_factory = None if block is None else check_factory(block)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2 classes, got {num_classes}")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.image_size = check_positive_int("image_size", image_size)
        feature_map_size(image_size)  # rejects images too small for three poolings
        self.backend = backend
        self.width = float(width)
        self.block_config = BlockConfig.scaled(width)
        if embedding == "prototype":
            prototype_dim = in_channels * image_size * image_size
            if embedding_dim not in (None, prototype_dim):
                raise ValueError(f"embedding_dim: a prototype embedding has the image size {prototype_dim}, got {embedding_dim}")
            embedding_dim = prototype_dim
        self.embedding = LabelEmbedding(embedding, num_classes, embedding_dim)

    @property
    def backend(self) -> str:
        """The backend of every op the model runs (see the class docstring)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        object.__setattr__(self, "_backend", backends.canonical(value, allow_auto=True))
        set_backend(self, self._backend)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module) and "_backend" in self.__dict__:  # a submodule added later: blocks
            set_backend(value, self._backend)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(in_channels, image_size, image_size)``."""
        return (self.in_channels, self.image_size, self.image_size)

    def block_arguments(self) -> dict:
        """The arguments every block of this model is built with (:class:`noprop.blocks.DTBlock` / ``TimeBlock``)."""
        return dict(
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            embed_dim=self.embed_dim,
            config=self.block_config,
            prototype=self.embedding.kind == "prototype",
        )

    def build_user_blocks(self, count: int, time_conditioned: bool) -> list[UserBlock]:
        """``count`` blocks from the model's block factory (:func:`noprop.user_blocks.build_blocks`)."""
        return build_blocks(self.block_factory, count, {**self.block_arguments(), "time_conditioned": time_conditioned})

    @property
    def embed_dim(self) -> int:
        """The label embedding dimension ``D``."""
        return self.embedding.dim

    def config(self) -> dict:
        """Constructor arguments that rebuild this model (stored in checkpoints).

        A model with a user block records its factory as the string ``"module:qualname"`` under
        ``"block"``: rebuilding needs the factory itself in its place (:mod:`noprop.user_blocks`).
        """
        block = {} if self.block_factory is None else {"block": factory_name(self.block_factory)}
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "embedding": self.embedding.kind,
            "embedding_dim": self.embedding.dim,
            "width": self.width,
            "backend": self.backend,
            **block,
        }

    def check_inputs(self, x: object, y: object | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate images ``x [B, C_in, H, W]`` (floating, finite, the model's shape) and labels ``y [B]``.

        One rule for every model: ``x`` must hold at least one example (an empty batch has no
        loss and no prediction), and a model with BatchNorm (DT, the discrete baseline) needs at
        least two in training mode. Images in another floating dtype than the model's (float64,
        bfloat16, float16) are cast to the model's dtype; they must be on the model's device.

        Raises:
            TypeError: non-floating images or non-integer labels.
            ValueError: an empty batch, a training batch of one for a BatchNorm model, another
                device, a shape mismatch, labels outside ``[0, num_classes)``, a label count
                different from the batch, or NaN/Inf in ``x``.
        """
        reference = self.embedding.weight
        if isinstance(x, torch.Tensor) and x.device != reference.device:
            raise ValueError(f"x: expected a tensor on the model's device {reference.device}, got one on {x.device}")
        x = check_images("x", x, self.image_shape)
        if x.shape[0] == 0:
            raise ValueError(f"x: an empty batch (shape {list(x.shape)}); every model needs at least one example")
        if x.dtype != reference.dtype:
            x = x.to(reference.dtype)
        if x.shape[0] == 1 and self.training and self._has_batch_norm():
            raise ValueError(
                "x: a training batch of one example; this model's BatchNorm cannot normalise a single "
                "example in training mode (use at least 2, or model.eval() for inference)"
            )
        if y is not None:
            y = check_labels("y", y, self.num_classes, x.shape[0])
            if y.device != x.device:
                raise ValueError(f"y: expected a tensor on the model's device {x.device}, got one on {y.device}")
        return x, y

    def _has_batch_norm(self) -> bool:
        found = self.__dict__.get("_batch_norm_found")
        if found is None:
            found = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())
            self.__dict__["_batch_norm_found"] = found
        return found

    def reset_classifier(self) -> None:
        """Start the linear classifier on ``z`` as the embedding itself: ``logits_c = <z, u_c>``.

        The classifier reads ``z_T ~ q(z_T | y)``, which is close to ``u_y``, so this starting point
        already ranks the right class first; from PyTorch's random initialisation the classifier
        needs a few hundred steps at the paper's learning rate of 1e-3 before its argmax follows
        the blocks (measured on the 8,000-image MNIST split at a quarter width: NoProp-DT test
        accuracy 53.5% after 3 epochs from the random start, 92.1% from this one). The paper does
        not specify the classifier's initialisation.
        """
        classifier = getattr(self, "classifier", None)
        if classifier is not None:
            with torch.no_grad():
                classifier.weight.copy_(self.embedding.weight)
                classifier.bias.zero_()

    def initialize_from_data(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Data-dependent initialisation before training: a prototype embedding's class medoids
        (:meth:`noprop.embeddings.LabelEmbedding.initialize_prototypes`), then the classifier."""
        if self.embedding.kind == "prototype":
            self.embedding.initialize_prototypes(images, labels)
            self.reset_classifier()

    def draw_seed(self, device: torch.device) -> torch.Tensor:
        """A fresh noise seed for one step: int64 ``[1]`` drawn on ``device`` from torch's RNG (no host sync)."""
        return torch.randint(0, rng.SEED_LIMIT // 2, (1,), device=device, dtype=torch.int64)

    def draw_step_seeds(self, device: torch.device) -> StepSeeds:
        """The noise and dropout seeds of one training step (two draws from torch's RNG, no host sync)."""
        return StepSeeds(self.draw_seed(device), self.draw_seed(device))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step's full objective (a scalar to call ``backward`` on)."""
        return self.loss_terms(x, y).total

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> LossTerms:
        """The objective and its named parts (see :class:`noprop.objectives.LossTerms`)."""
        raise NotImplementedError

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradient norm of all parameters to ``max_norm`` (no host sync); returns the norm before.

        NoPropDT overrides this to clip every block separately.
        """
        parameters = [p for p in self.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)

    def predict(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        solver: str | None = None,
        deterministic: bool = False,
        seed: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` from images ``x [B, C_in, H, W]`` alone (the label is never read).

        Args:
            x: images ``[B, C_in, H, W]``.
            steps: inference steps (CT, FM); DT and the baseline run exactly their T blocks.
            solver: one of the model's :attr:`solvers`; None is its :attr:`default_solver`
                (CT: ``"ancestral"``, ``"euler"`` or ``"heun"``, default ancestral; FM:
                ``"euler"`` or ``"heun"``, default euler; DT and the baseline have none and ignore it).
            deterministic: no sampling noise (``z_0 = 0``, noiseless steps).
            seed: seed of the inference noise; drawn if None.
        """
        raise NotImplementedError

    @classmethod
    def resolve_solver(cls, solver: str | None, name: str = "solver") -> str | None:
        """The solver ``predict`` runs: :attr:`default_solver` for None, else ``solver`` if it is one of :attr:`solvers`.

        Raises:
            ValueError: naming ``name`` (e.g. ``"--solver"`` on the command line), if ``solver`` is
                not one of :attr:`solvers` (any value, for a model without a choice of solver).
        """
        if solver is None:
            return cls.default_solver
        if not cls.solvers:
            raise ValueError(f"{name}: method {cls.method!r} has no choice of solver (it runs its T blocks), got {solver!r}")
        return check_choice(f"{name} (method {cls.method!r})", solver, cls.solvers)

    def _inference_seed(self, seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
        return self.draw_seed(device) if seed is None else rng.as_seed_tensor(seed, device)
