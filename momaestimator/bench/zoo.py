"""The embedded benchmark zoo: a small open_clip ViT, frozen heads and one expert per task.

The zoo follows the task_vectors protocol of the field's 8-task CLIP benchmark at a scale that
builds on two CPU cores:

1. **Backbone.** An ``open_clip.transformer.VisionTransformer`` image tower (28 px input, grey
   images repeated to 3 channels and normalised with CLIP's channel statistics). It is
   "pretrained" by the library on :func:`~momaestimator.bench.datasets.load_generic_pool` images,
   which are disjoint from every task's train and test data: the pool is clustered with k-means
   (on PCA-whitened pixels) and the tower learns to predict the cluster ids through a cosine
   classifier (no task labels are ever used).
2. **Heads.** One :class:`~momaestimator.models.LinearHead` per task on L2-normalised features,
   fitted once on the *pretrained* features of the task's train split (normalised class means
   times a logit scale, the analogue of CLIP's zero-shot text heads), then frozen.
3. **Experts.** The whole encoder is fine-tuned per task through its frozen head with
   cross-entropy **plus a feature anchor**: ``anchor_weight · mean ‖f_θ(u)/‖f_θ(u)‖ −
   f_θ0(u)/‖f_θ0(u)‖‖²`` on batches ``u`` of generic-pool images (never task images). Without
   the anchor the experts drift so far that Task Arithmetic barely beats the pretrained model and
   its best λ sits at the grid's lower edge; with it the zoo lands in the field's regime (Task
   Arithmetic recovers roughly half of the pretrained → individual gap, best λ mid-range). Set
   ``ZooConfig(anchor_weight=0)`` for the plain protocol. Measured (seed 0, 8 tasks, 2 CPU cores):
   anchor 0 → Task Arithmetic recovers 23 % of the gap at λ* = 0.2 (individual 91.3); anchor 10
   (default) → pretrained 69.6, TA 77.7 at λ* = 0.7, individual 85.5, 51 % recovered (49-59 %
   over seeds 0-3).
4. **Splits.** Each task's train subsample is split (stratified, seeded) into a train part (heads
   and experts) and a validation part (choosing λ for Task Arithmetic); the test split is the
   dataset's fixed test split.

The supervised parts (pretraining, expert fine-tuning) run through skorch ``NeuralNet`` with a
one-cycle ``LRScheduler`` callback; every training is seeded so a build is deterministic on a
given machine and torch build. Results are cached with ``joblib.Memory`` under ``cache_dir``
(default ``$MOMA_CACHE`` or ``~/.cache/momaestimator/zoo``): pretraining is keyed by the
pretraining fields of the config and the seed, each expert by the full config, the seed and its
task, so adding a task trains only that task's expert.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..merging import task_arithmetic
from ..models import LinearHead
from .datasets import TASKS, load_generic_pool, load_task

__all__ = [
    "TaskSplit",
    "Zoo",
    "ZooConfig",
    "accuracy",
    "build_zoo",
    "code_version",
    "default_cache_dir",
    "encode",
    "make_tower",
    "quick_config",
    "regime",
    "to_tower_input",
]

# CLIP's image normalisation (open_clip.constants.OPENAI_DATASET_MEAN / STD).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ZooConfig:
    """Every knob of the zoo; the defaults are the benchmark's.

    Parameters
    ----------
    image_size : int, default=28
        Input side in pixels.
    patch_size : int, default=7
        ViT patch side (28 / 7 = 4 × 4 tokens).
    width : int, default=64
        Transformer width.
    layers : int, default=4
        Number of residual attention blocks.
    heads : int, default=4
        Attention heads per block.
    mlp_ratio : float, default=2.0
        MLP hidden size / width.
    output_dim : int, default=64
        Feature dimension after the tower's projection (what the heads see).
    max_train : int, default=2000
        Cap on each task's train subsample (before the validation split).
    max_test : int, default=1000
        Cap on each task's test split.
    val_fraction : float, default=0.2
        Share of the train subsample held out (stratified) as the validation split.
    pool_size : int, default=20000
        Generic-pool images used for pretraining.
    n_clusters : int, default=64
        k-means pseudo-classes of the pool for pretraining.
    pca_components : int, default=64
        PCA (whitened) dimensions the pool pixels are clustered in.
    pretrain_steps : int, default=1200
        Optimiser steps of pretraining.
    pretrain_batch_size : int, default=128
        Pretraining batch size.
    pretrain_lr : float, default=1e-3
        Peak learning rate of AdamW (one-cycle schedule) for pretraining.
    pretrain_weight_decay : float, default=0.05
        AdamW weight decay for pretraining.
    pretrain_logit_scale : float, default=16.0
        Scale of the cosine classifier used for the pseudo-labels.
    head_logit_scale : float, default=50.0
        Scale of the frozen heads (normalised class means × this).
    expert_steps : int, default=400
        Optimiser steps of each expert's fine-tuning.
    expert_batch_size : int, default=64
        Fine-tuning batch size.
    expert_lr : float, default=1e-3
        Peak learning rate of AdamW (one-cycle schedule) for the experts.
    expert_weight_decay : float, default=0.01
        AdamW weight decay for the experts.
    anchor_weight : float, default=10.0
        Weight of the feature anchor (see the module docstring); 0 disables it.
    anchor_batch_size : int, default=64
        Generic images per fine-tuning step for the anchor.
    anchor_pool_size : int, default=4096
        Generic images (drawn from the pool, after the pretraining ones) the anchor samples from.
    device : str, default="cpu"
        Torch device for training (the returned modules are always on the CPU).
    num_threads : int or None, default=1
        ``torch.set_num_threads`` during the build and :func:`regime`; ``None`` leaves it alone.
        Not part of the cache key (it changes speed and float rounding, not the recipe). One
        thread is the default because on a shared 2-core machine two threads ran 2-20x slower
        per step (OpenMP oversubscription); on two dedicated cores ``2`` is about 1.8x faster.
    """

    image_size: int = 28
    patch_size: int = 7
    width: int = 64
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    output_dim: int = 64
    max_train: int = 2000
    max_test: int = 1000
    val_fraction: float = 0.2
    pool_size: int = 20000
    n_clusters: int = 64
    pca_components: int = 64
    pretrain_steps: int = 1200
    pretrain_batch_size: int = 128
    pretrain_lr: float = 1e-3
    pretrain_weight_decay: float = 0.05
    pretrain_logit_scale: float = 16.0
    head_logit_scale: float = 50.0
    expert_steps: int = 400
    expert_batch_size: int = 64
    expert_lr: float = 1e-3
    expert_weight_decay: float = 0.01
    anchor_weight: float = 10.0
    anchor_batch_size: int = 64
    anchor_pool_size: int = 4096
    device: str = "cpu"
    num_threads: int | None = 1


# Fields that determine the pretrained tower (its cache key); the rest only affect heads/experts.
_PRETRAIN_FIELDS = (
    "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim", "pool_size",
    "anchor_pool_size",  # the pool's size decides which images the pretraining part gets
    "n_clusters", "pca_components", "pretrain_steps", "pretrain_batch_size", "pretrain_lr",
    "pretrain_weight_decay", "pretrain_logit_scale", "device",
)  # fmt: skip


def quick_config(**overrides) -> ZooConfig:
    """A reduced zoo for tests and CI: a smaller tower, fewer steps, smaller splits.

    Parameters
    ----------
    **overrides
        Fields to change on top of the quick settings.

    Returns
    -------
    ZooConfig
    """
    quick = dict(
        width=32, layers=2, heads=2, output_dim=32, max_train=400, max_test=200, pool_size=2000,
        n_clusters=10, pca_components=16, pretrain_steps=60, pretrain_batch_size=64, expert_steps=40, expert_lr=3e-3,
        expert_batch_size=32, anchor_batch_size=32, anchor_pool_size=256,
    )  # fmt: skip
    quick.update(overrides)
    return ZooConfig(**quick)


@dataclass
class TaskSplit:
    """One task's images, ready for the tower.

    Images are float32 tensors of shape ``(n, 3, 28, 28)``: grey repeated to 3 channels and
    normalised with CLIP's channel mean and std (see :func:`to_tower_input`). Labels are int64.

    Attributes
    ----------
    name : str
    classes : list of str
    X_train, y_train : torch.Tensor
        Used to fit the head and the expert.
    X_val, y_val : torch.Tensor
        Held out from the train subsample; for choosing hyper-parameters such as λ.
    X_test, y_test : torch.Tensor
        The dataset's fixed test split.
    """

    name: str
    classes: list[str]
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


@dataclass
class Zoo:
    """A pretrained tower, one frozen head and one fine-tuned expert per task, and the data.

    Attributes
    ----------
    config : ZooConfig
    tasks : list of str
    pretrained : open_clip.transformer.VisionTransformer
        The pretrained tower ``θ0`` (eval mode, CPU).
    experts : dict of str to VisionTransformer
        The fine-tuned towers ``θt`` (eval mode, CPU).
    heads : dict of str to LinearHead
        Frozen heads on normalised features (``requires_grad=False``).
    data : dict of str to TaskSplit
    build_seconds : dict
        Wall seconds: ``"pretrain"`` and one entry per task as measured when each was built
        (also when loaded from the cache), plus ``"total"`` (this call) and ``"cached"`` (whether
        everything came from the cache).
    seed : int
    """

    config: ZooConfig
    tasks: list[str]
    pretrained: nn.Module
    experts: dict[str, nn.Module]
    heads: dict[str, LinearHead]
    data: dict[str, TaskSplit]
    build_seconds: dict = field(default_factory=dict)
    seed: int = 0


# ----------------------------------------------------------------------------- building blocks


def make_tower(config: ZooConfig) -> nn.Module:
    """An untrained open_clip ``VisionTransformer`` with the config's shape.

    Parameters
    ----------
    config : ZooConfig

    Returns
    -------
    open_clip.transformer.VisionTransformer
    """
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        output_dim=config.output_dim,
    )


def to_tower_input(images) -> torch.Tensor:
    """Grey images in ``[0, 1]`` → normalised 3-channel float32 tensor.

    Parameters
    ----------
    images : array-like of shape (n, H, W)

    Returns
    -------
    torch.Tensor of shape (n, 3, H, W)
    """
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@torch.no_grad()
def encode(tower: nn.Module, X: torch.Tensor, *, batch_size: int = 1024, device="cpu") -> torch.Tensor:
    """Features of ``X`` under ``tower`` (eval mode, no grad), on the CPU.

    Parameters
    ----------
    tower : torch.nn.Module
    X : torch.Tensor of shape (n, 3, H, W)
    batch_size : int, default=1024
    device : str or torch.device, default="cpu"

    Returns
    -------
    torch.Tensor of shape (n, output_dim)
    """
    was_training = tower.training
    tower.eval()
    out = [tower(X[i : i + batch_size].to(device)).cpu() for i in range(0, len(X), batch_size)]
    tower.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(tower: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent of ``head(tower(X))``.

    Parameters
    ----------
    tower, head : torch.nn.Module
    X : torch.Tensor
    y : torch.Tensor

    Returns
    -------
    float
    """
    with torch.no_grad():
        pred = head(encode(tower, X)).argmax(-1)
    return 100.0 * float((pred == y).float().mean())


def _task_seed(seed: int, task: str) -> int:
    """A stable per-task seed, independent of which other tasks are built."""
    return (int(seed) * 1_000_003 + zlib.crc32(task.encode())) % (2**31)


def _stratified_split(y: np.ndarray, fraction: float, seed: int):
    """Indices (train, val) with ``round(fraction · n_c)`` (≥ 1) val images per class."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, round(fraction * len(idx))) if fraction > 0 and len(idx) > 1 else 0
        val.append(idx[:k])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(y)), val)
    return rng.permutation(train), rng.permutation(val)


def _load_split(task: str, seed: int, config: ZooConfig) -> TaskSplit:
    data = load_task(task, max_train=config.max_train, max_test=config.max_test, random_state=seed)
    tr, va = _stratified_split(data.y_train, config.val_fraction, _task_seed(seed, task))
    return TaskSplit(
        name=task,
        classes=list(data.classes),
        X_train=to_tower_input(data.X_train[tr]),
        y_train=torch.from_numpy(np.array(data.y_train[tr])),
        X_val=to_tower_input(data.X_train[va]),
        y_val=torch.from_numpy(np.array(data.y_train[va])),
        X_test=to_tower_input(data.X_test),
        y_test=torch.from_numpy(np.array(data.y_test)),
    )


def _pool(config: ZooConfig, seed: int):
    """(pretraining images, anchor images) as tower inputs, disjoint parts of one generic pool."""
    pool = load_generic_pool(n=config.pool_size + config.anchor_pool_size, random_state=seed)
    return to_tower_input(pool[: config.pool_size]), to_tower_input(pool[config.pool_size :])


class _CosineClassifier(nn.Module):
    """Tower → normalised features → cosine similarity to learned class vectors × scale."""

    def __init__(self, tower, n_classes, scale):
        super().__init__()
        self.tower = tower
        self.weight = nn.Parameter(torch.randn(n_classes, tower.output_dim) / math.sqrt(tower.output_dim))
        self.scale = float(scale)

    def forward(self, x):
        z = nn.functional.normalize(self.tower(x), dim=-1)
        return self.scale * z @ nn.functional.normalize(self.weight, dim=-1).T


class _TowerWithHead(nn.Module):
    """Tower → frozen head (the expert fine-tuning model)."""

    def __init__(self, tower, head):
        super().__init__()
        self.tower = tower
        self.head = head

    def forward(self, x):
        return self.head(self.tower(x))


def _net_class():
    """skorch ``NeuralNet`` subclass with the optional feature anchor (imported lazily)."""
    from skorch import NeuralNet

    class AnchoredNet(NeuralNet):
        """``NeuralNet`` training only parameters that require grad, plus an optional feature anchor.

        With ``anchor_weight > 0`` the training loss adds ``anchor_weight · mean_u ‖n(f_θ(u)) −
        n(f_θ0(u))‖²`` (``n`` = L2 normalisation) on ``anchor_batch_size`` images drawn each step
        from ``anchor_X``, whose pretrained normalised features are ``anchor_Z``.
        """

        def __init__(self, *args, anchor_weight=0.0, anchor_X=None, anchor_Z=None, anchor_batch_size=64,
                     anchor_seed=0, **kwargs):  # fmt: skip
            super().__init__(*args, **kwargs)
            self.anchor_weight = anchor_weight
            self.anchor_X = anchor_X
            self.anchor_Z = anchor_Z
            self.anchor_batch_size = anchor_batch_size
            self.anchor_seed = anchor_seed

        def get_all_learnable_params(self):
            for name, param in super().get_all_learnable_params():
                if param.requires_grad:
                    yield name, param

        def get_loss(self, y_pred, y_true, X=None, training=False):
            loss = super().get_loss(y_pred, y_true, X=X, training=training)
            if training and self.anchor_weight > 0:
                if getattr(self, "anchor_generator_", None) is None:
                    self.anchor_generator_ = torch.Generator().manual_seed(int(self.anchor_seed))
                idx = torch.randint(len(self.anchor_X), (self.anchor_batch_size,), generator=self.anchor_generator_)
                z = nn.functional.normalize(self.module_.tower(self.anchor_X[idx].to(self.device)), dim=-1)
                drift = (z - self.anchor_Z[idx].to(self.device)).pow(2).sum(-1).mean()
                loss = loss + self.anchor_weight * drift
            return loss

    return AnchoredNet


def _train(module, X, y, *, steps, batch_size, lr, weight_decay, seed, device, **net_kwargs):
    """Train ``module`` for exactly ``steps`` AdamW steps (one-cycle) with skorch; deterministic."""
    from skorch.callbacks import LRScheduler

    torch.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(
        range(len(X)), replacement=True, num_samples=steps * batch_size,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    net = _net_class()(
        module,
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.AdamW,
        optimizer__weight_decay=weight_decay,
        lr=lr,
        max_epochs=1,
        batch_size=batch_size,
        train_split=None,
        iterator_train__sampler=sampler,
        iterator_train__shuffle=False,
        callbacks=[
            (
                "onecycle",
                LRScheduler(
                    policy=torch.optim.lr_scheduler.OneCycleLR, max_lr=lr, total_steps=steps, step_every="batch"
                ),
            ),
        ],  # fmt: skip
        device=device,
        verbose=0,
        **net_kwargs,
    )
    net.fit(X, y)
    module = net.module_.cpu().eval()
    return module, [float(h["train_loss"]) for h in net.history]


def _pseudo_labels(images: torch.Tensor, config: ZooConfig, seed: int) -> np.ndarray:
    """k-means clusters of PCA-whitened pool pixels (one channel)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    flat = images[:, 0].reshape(len(images), -1).numpy().astype(np.float64)
    reduced = PCA(config.pca_components, whiten=True, random_state=seed).fit_transform(flat)
    kmeans = KMeans(config.n_clusters, n_init=3, random_state=seed).fit(reduced)
    return kmeans.labels_.astype(np.int64)


class _Threads:
    """Set ``torch.set_num_threads`` inside a ``with`` block (``None``: leave it alone)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def code_version() -> str:
    """A fingerprint of everything besides the config that decides the zoo: the benchmark's own
    sources (zoo, datasets, the models it builds on) and the versions of the packages that compute
    or ship its data. Part of every cache key, so that changed code never reuses a stale zoo.

    Returns
    -------
    str
        A hex digest.

    Examples
    --------
    >>> len(code_version())
    64
    """
    import hashlib
    from importlib import metadata

    from .. import models
    from . import datasets

    digest = hashlib.sha256()
    for module in (sys.modules[__name__], datasets, models):
        digest.update(Path(module.__file__).read_bytes())
    for dist in ("torch", "open_clip_torch", "numpy", "scikit-learn", "scikit-image", "mlxtend", "animal-mnist"):
        try:
            digest.update(f"{dist}={metadata.version(dist)};".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{dist}=absent;".encode())
    digest.update(os.environ.get("MOMA_FASHION_MNIST_DIR", "").encode())
    return digest.hexdigest()


def _pretrain(pretrain_fields: dict, seed: int, code: str = ""):
    """Pretrained tower state dict, anchor targets and timing (cached by the caller; ``code``, the
    :func:`code_version`, is part of the cache key only).
    """
    config = ZooConfig(**pretrain_fields)
    start = time.perf_counter()
    X_pool, _ = _pool(config, seed)
    labels = _pseudo_labels(X_pool, config, seed)
    torch.manual_seed(seed)
    tower = make_tower(config)
    module = _CosineClassifier(tower, config.n_clusters, config.pretrain_logit_scale)
    module, losses = _train(
        module, X_pool, torch.as_tensor(labels), steps=config.pretrain_steps,
        batch_size=config.pretrain_batch_size, lr=config.pretrain_lr,
        weight_decay=config.pretrain_weight_decay, seed=seed, device=config.device,
    )  # fmt: skip
    state = {k: v.detach().clone() for k, v in module.tower.state_dict().items()}
    return {"state": state, "seconds": time.perf_counter() - start, "losses": losses}


def _class_mean_head(features: torch.Tensor, y: torch.Tensor, n_classes: int, scale: float) -> LinearHead:
    z = nn.functional.normalize(features, dim=-1)
    means = torch.stack([z[y == c].mean(0) for c in range(n_classes)])
    head = LinearHead(scale * nn.functional.normalize(means, dim=-1), normalize=True)
    head.requires_grad_(False)
    return head.eval()


def _expert(config: ZooConfig, seed: int, task: str, pretrain_cache, code: str = ""):
    """Head weights, expert state dict and timing for one task (cached by the caller; ``code`` is
    part of the key: the experts' key covers the pretrained tower's code and settings too).
    """
    pre = pretrain_cache(_pretrain_fields(config), seed, code)
    start = time.perf_counter()
    split = _load_split(task, seed, config)
    tower = make_tower(config)
    tower.load_state_dict(pre["state"])
    tower.eval()
    head = _class_mean_head(encode(tower, split.X_train), split.y_train, split.n_classes, config.head_logit_scale)
    anchor = {}
    if config.anchor_weight > 0:
        _, X_anchor = _pool(config, seed)
        anchor = dict(
            anchor_weight=config.anchor_weight, anchor_X=X_anchor,
            anchor_Z=nn.functional.normalize(encode(tower, X_anchor), dim=-1),
            anchor_batch_size=config.anchor_batch_size, anchor_seed=_task_seed(seed + 1, task),
        )  # fmt: skip
    tower.train()
    module, losses = _train(
        _TowerWithHead(tower, copy.deepcopy(head)), split.X_train, split.y_train,
        steps=config.expert_steps, batch_size=config.expert_batch_size, lr=config.expert_lr,
        weight_decay=config.expert_weight_decay, seed=_task_seed(seed, task), device=config.device, **anchor,
    )  # fmt: skip
    state = {k: v.detach().clone() for k, v in module.tower.state_dict().items()}
    return {
        "head_weight": head.weight.detach().clone(),
        "head_bias": head.bias.detach().clone(),
        "state": state,
        "seconds": time.perf_counter() - start,
        "losses": losses,
    }


def _pretrain_fields(config: ZooConfig) -> dict:
    return {k: getattr(config, k) for k in _PRETRAIN_FIELDS}


def default_cache_dir() -> Path:
    """``$MOMA_CACHE/zoo`` if ``MOMA_CACHE`` is set, else ``~/.cache/momaestimator/zoo``."""
    root = os.environ.get("MOMA_CACHE")
    return Path(root) / "zoo" if root else Path.home() / ".cache" / "momaestimator" / "zoo"


def _tower_from_state(config, state):
    tower = make_tower(config)
    tower.load_state_dict(state)
    return tower.eval()


def build_zoo(tasks=None, *, seed=0, config=None, cache_dir=None, verbose=True) -> Zoo:
    """Build (or load from the cache) the benchmark zoo.

    Parameters
    ----------
    tasks : sequence of str or None, default=None
        Task names; ``None`` means all of :data:`~momaestimator.bench.datasets.TASKS`.
    seed : int, default=0
        Seeds the pool, the pseudo-labels, the tower initialisation, every training run and
        the tasks' train subsamples and validation splits.
    config : ZooConfig or None, default=None
        ``None`` means ``ZooConfig()`` (the benchmark default); see :func:`quick_config`.
    cache_dir : str or path-like or None, default=None
        Where ``joblib.Memory`` stores results; ``None`` means :func:`default_cache_dir`.
        Pass ``False`` to disable caching.
    verbose : bool, default=True
        Print one line per built (or loaded) component.

    Returns
    -------
    Zoo
    """
    from joblib import Memory

    config = ZooConfig() if config is None else config
    tasks = list(TASKS if tasks is None else tasks)
    if cache_dir is False:
        memory = Memory(None, verbose=0)
    else:
        memory = Memory(str(default_cache_dir() if cache_dir is None else cache_dir), verbose=0)
    with _Threads(config.num_threads):
        return _build(tasks, seed, config, memory, verbose)


def _build(tasks, seed, config, memory, verbose):
    pretrain_cached = memory.cache(_pretrain)
    expert_cached = memory.cache(_expert, ignore=["pretrain_cache"])
    key = dataclasses.replace(config, num_threads=None)  # threads change speed, not the cache key
    start = time.perf_counter()
    seconds = {}
    cached = True

    def log(msg):
        if verbose:
            print(f"[zoo] {msg}", flush=True)

    fields, code = _pretrain_fields(config), code_version()
    if not hasattr(pretrain_cached, "check_call_in_cache") or not pretrain_cached.check_call_in_cache(
        fields, seed, code
    ):
        cached = False
    t0 = time.perf_counter()
    pre = pretrain_cached(fields, seed, code)
    seconds["pretrain"] = pre["seconds"]
    log(f"pretrained tower: {pre['seconds']:.1f} s to build, {time.perf_counter() - t0:.1f} s now")

    experts, heads, data = {}, {}, {}
    for task in tasks:
        if cached and not expert_cached.check_call_in_cache(key, seed, task, pretrain_cached, code):
            cached = False
        t0 = time.perf_counter()
        out = expert_cached(key, seed, task, pretrain_cached, code)
        experts[task] = _tower_from_state(config, out["state"])
        head = LinearHead(out["head_weight"], out["head_bias"], normalize=True)
        heads[task] = head.requires_grad_(False).eval()
        data[task] = _load_split(task, seed, config)
        seconds[task] = out["seconds"]
        log(f"expert {task}: {out['seconds']:.1f} s to build, {time.perf_counter() - t0:.1f} s now")
    seconds["total"] = time.perf_counter() - start
    seconds["cached"] = cached
    return Zoo(
        config=config,
        tasks=tasks,
        pretrained=_tower_from_state(config, pre["state"]),
        experts=experts,
        heads=heads,
        data=data,
        build_seconds=seconds,
        seed=int(seed),
    )


# ----------------------------------------------------------------------------- regime


def regime(zoo: Zoo, lambdas=None, *, split="test") -> dict:
    """Where the zoo sits: pretrained, Task Arithmetic at the validation-best λ, individual.

    Parameters
    ----------
    zoo : Zoo
    lambdas : sequence of float or None, default=None
        Task Arithmetic scales tried; ``None`` means 0.1, 0.2, …, 1.0. The one with the best mean
        validation accuracy is kept (the smallest on ties).
    split : {"test", "val"}, default="test"
        Where the reported accuracies are measured.

    Returns
    -------
    dict
        ``pretrained``, ``task_arithmetic``, ``individual`` (mean accuracies in %), ``lambda``
        (the chosen λ), ``recovered_fraction`` (``(TA − pretrained) / (individual − pretrained)``),
        ``per_task`` (``{task: {"pretrained", "task_arithmetic", "individual"}}``) and
        ``val_curve`` (``{λ: mean validation accuracy}``).
    """
    lambdas = [round(0.1 * k, 10) for k in range(1, 11)] if lambdas is None else [float(v) for v in lambdas]
    with _Threads(zoo.config.num_threads):
        return _regime(zoo, lambdas, split)


def _regime(zoo, lambdas, split):
    tasks = zoo.tasks

    def scores(tower, which):
        out = {}
        for t in tasks:
            d = zoo.data[t]
            X, y = (d.X_test, d.y_test) if which == "test" else (d.X_val, d.y_val)
            out[t] = accuracy(tower, zoo.heads[t], X, y)
        return out

    merged = copy.deepcopy(zoo.pretrained)
    curve, best = {}, None
    for lam in lambdas:
        merged.load_state_dict(task_arithmetic(zoo.pretrained, zoo.experts, lam))
        curve[lam] = float(np.mean(list(scores(merged, "val").values())))
        if best is None or curve[lam] > curve[best]:
            best = lam
    merged.load_state_dict(task_arithmetic(zoo.pretrained, zoo.experts, best))
    pre = scores(zoo.pretrained, split)
    ta = scores(merged, split)
    ind = {}
    for t in tasks:
        d = zoo.data[t]
        X, y = (d.X_test, d.y_test) if split == "test" else (d.X_val, d.y_val)
        ind[t] = accuracy(zoo.experts[t], zoo.heads[t], X, y)
    means = {k: float(np.mean(list(v.values()))) for k, v in (("pretrained", pre), ("task_arithmetic", ta),
                                                                ("individual", ind))}  # fmt: skip
    gap = means["individual"] - means["pretrained"]
    return {
        **means,
        "lambda": best,
        "recovered_fraction": (means["task_arithmetic"] - means["pretrained"]) / gap if gap else float("nan"),
        "per_task": {t: {"pretrained": pre[t], "task_arithmetic": ta[t], "individual": ind[t]} for t in tasks},
        "val_curve": curve,
    }
