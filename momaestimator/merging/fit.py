"""The MOMA fitting loop: learn the global mask and the per-task rotations jointly (pure torch).

``fit_moma`` is the template the estimator calls; its pieces are small functions so a reader
finds each concept in one place: teacher targets (:func:`teacher_targets`), the masked
merged forward (:func:`moma_logits`), one optimisation step (:func:`train_step`) and the
held-out unlabeled loss used for early stopping (:func:`validation_loss`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from torch.optim.adam import adam as functional_adam

from .checkpointing import BlockMerge, _within, find_blocks, recompute_blocks
from .functional import encode, private_buffers, structure_copy
from .mask import GlobalMask, masked_merge, score_gradient
from .objectives import OBJECTIVES
from .rotation import Rotations, orthogonal_procrustes
from .task_vectors import as_state_dict

__all__ = [
    "FitConfig",
    "FitResult",
    "GraphedPass",
    "ScoreAdam",
    "fit_moma",
    "moma_logits",
    "pass_plan",
    "recomputed_blocks",
    "task_groups",
    "teacher_targets",
    "to_device",
]


@dataclass
class FitConfig:
    """Settings of one MOMA fit (see :class:`momaestimator.MOMAMerger` for their meaning).

    Parameters
    ----------
    sparsity : float, default=0.1
        Fraction of ``τ_MT``'s entries the mask removes.
    scaling : float, default=0.3
        λ.
    use_mask : bool, default=True
        Learn the mask (``MOMAMerger``'s ``learn_mask``).
    use_rotations : bool, default=True
        Learn the rotations (``learn_rotations``).
    objective : {"kl", "feature", "entropy"}, default="kl"
        The loss.
    n_steps : int, default=100
        Optimisation steps.
    lr : float, default=0.05
        Adam learning rate of the mask scores.
    rotation_lr : float, default=1e-3
        Adam learning rate of the rotation generators.
    batch_size : int, default=16
        Samples per task per step.
    eval_every : int, default=10
        Steps between held-out evaluations.
    rotation_map : {"exp", "cayley"}, default="exp"
        Generator-to-rotation map.
    rotation_init : {"identity", "procrustes"}, default="identity"
        Where each ``Q_t`` starts: the identity, or the rotation that best maps the start's
        (normalised) features of the task's fit inputs onto its expert's
        (:func:`~momaestimator.merging.rotation.orthogonal_procrustes`); the fit learns
        ``Q_t = B_t exp(S_t)`` from there.
    autocast_dtype : torch.dtype or None, default=None
        Autocast dtype of the encoder's forward pass.
    task_batching : {"joint", "sequential"} or int, default="sequential"
        Tasks per forward/backward pass (:func:`task_groups`); gradients accumulate over passes.
    micro_batch_size : int or None, default=None
        At most this many samples per forward/backward pass: the tasks' batches of a pass are
        split (:func:`pass_plan`); ``None`` splits nothing.
    gradient_checkpointing : bool, type or tuple of types, default=False
        Recompute the encoder's blocks (:func:`.checkpointing.find_blocks`) in each pass's backward
        instead of keeping their activations.
    recompute_merged_weights : bool, default=False
        Merge the weights of those blocks (the repeated blocks when ``gradient_checkpointing`` is
        off) inside each block as it runs, and again in backward, instead of keeping one merged
        copy of the encoder for the whole fit (:class:`.checkpointing.BlockMerge`).
    cuda_graphs : bool, default=True
        On a CUDA device, capture each pass's encoder forward and backward as CUDA graphs after
        the first steps and replay them (:class:`GraphedPass`); ignored on other devices.
    verbose : int, default=0
        Verbosity.

    Examples
    --------
    >>> FitConfig(sparsity=0.2, n_steps=10).rotation_lr
    0.001
    """

    sparsity: float = 0.1
    scaling: float = 0.3
    use_mask: bool = True
    use_rotations: bool = True
    objective: str = "kl"
    n_steps: int = 100
    lr: float = 0.05
    rotation_lr: float = 1e-3
    batch_size: int = 16
    eval_every: int = 10
    rotation_map: str = "exp"
    rotation_init: str = "identity"
    autocast_dtype: torch.dtype | None = None
    task_batching: str | int = "sequential"
    micro_batch_size: int | None = None
    gradient_checkpointing: bool | type | tuple = False
    recompute_merged_weights: bool = False
    cuda_graphs: bool = True
    verbose: int = 0

    def __post_init__(self):
        _check_range(self.sparsity, "sparsity", 0.0, 1.0, high_open=True)
        _check_range(self.scaling, "scaling", 0.0, math.inf, low_open=True)
        _check_range(self.lr, "lr", 0.0, math.inf, low_open=True)
        _check_range(self.rotation_lr, "rotation_lr", 0.0, math.inf, low_open=True)
        _check_count(self.n_steps, "n_steps", 0)
        _check_count(self.batch_size, "batch_size", 1)
        _check_count(self.eval_every, "eval_every", 1)
        if self.micro_batch_size is not None:
            _check_count(self.micro_batch_size, "micro_batch_size", 1)
        _check_task_batching(self.task_batching)
        for name, choices in (
            ("objective", tuple(OBJECTIVES)),
            ("rotation_map", ("exp", "cayley")),
            ("rotation_init", ("identity", "procrustes")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")


def _check_range(value, name, low, high, *, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def _check_count(value, name, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_task_batching(task_batching):
    if task_batching in ("joint", "sequential"):
        return
    if isinstance(task_batching, bool) or not isinstance(task_batching, numbers.Integral) or task_batching < 1:
        raise ValueError(f"task_batching must be 'joint', 'sequential' or an int >= 1, got {task_batching!r}")


@dataclass
class FitResult:
    """What a fit learned: binary mask, rotation matrices and the loss history.

    Parameters
    ----------
    mask : dict of str to torch.BoolTensor
        The binary mask over ``τ_MT`` per state-dict entry (``True`` = kept).
    rotations : dict of str to torch.Tensor
        ``Q_t`` per task.
    history : list of dict, default=[]
        One record per step (``step``, ``loss``, ``per_task_loss``, ``seconds``, ``valid_loss``).
    n_iter : int, default=0
        Steps run.
    best_step : int, default=0
        Step whose state was kept (0: the starting point).
    interrupted : bool, default=False
        Whether ``KeyboardInterrupt`` stopped the fit.

    Examples
    --------
    >>> import torch
    >>> FitResult(mask={}, rotations={"a": torch.eye(2)}).best_step
    0
    """

    mask: dict
    rotations: dict
    history: list = field(default_factory=list)
    n_iter: int = 0
    best_step: int = 0
    interrupted: bool = False


@dataclass
class HeadSpec:
    """A frozen head run functionally: structure copy + detached tensors."""

    skeleton: torch.nn.Module
    state: dict

    @classmethod
    def of(cls, head: torch.nn.Module, device) -> HeadSpec:
        """The spec of ``head`` on ``device``; its tensors are detached (an inference-mode tensor,
        which autograd could not save, is copied) and never written to.
        """
        state = {}
        for k, v in as_state_dict(head).items():  # a tensor used twice: one entry, under its first name
            v = v.to(device)
            state[k] = v.clone() if v.is_inference() else v
        return cls(skeleton=structure_copy(head, device=device), state=state)

    @property
    def dtype(self):
        """The head's floating dtype (``None`` for a head without float tensors)."""
        return next((v.dtype for v in self.state.values() if v.is_floating_point()), None)


def _head_logits(head: HeadSpec, features: torch.Tensor) -> torch.Tensor:
    """The head on (rotated) features; a half-precision head gets its own dtype, the logits come
    back in the features' (working) dtype.
    """
    dtype = head.dtype
    inputs = features if dtype is None or dtype == features.dtype else features.to(dtype)
    state = private_buffers(head.skeleton, head.state)
    logits = functional_call(head.skeleton, state, (inputs,), strict=False, tie_weights=True)
    return logits.to(features.dtype)


@torch.no_grad()
def teacher_targets(skeleton, state, head: HeadSpec, x, *, batch_size=256, autocast_dtype=None):
    """Logits and features of one fine-tuned expert (its encoder + its own head) on ``x``.

    Called once per task and fit; afterwards the expert's weights are no longer needed.

    Parameters
    ----------
    skeleton : torch.nn.Module
        Structure copy of the encoder (:func:`structure_copy`).
    state : dict of str to torch.Tensor
        The expert's state dict.
    head : HeadSpec
        The expert's frozen head (structure copy + tensors).
    x : torch.Tensor
        Inputs of the task.
    batch_size : int, default=256
        Inputs per forward pass.
    autocast_dtype : torch.dtype or None, default=None
        Autocast dtype of the encoder's forward pass.

    Returns
    -------
    logits : torch.Tensor of shape (n, n_classes)
    features : torch.Tensor of shape (n, d)

    Examples
    --------
    >>> import torch
    >>> from momaestimator import toy
    >>> from momaestimator.merging import FitConfig, fit_moma, multitask_vector, structure_copy, teacher_targets
    >>> from momaestimator.merging.fit import HeadSpec
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> theta0 = pre.state_dict()
    >>> tau = multitask_vector(theta0, {t: e.state_dict() for t, e in experts.items()})
    >>> skeleton = structure_copy(pre)
    >>> specs = {t: HeadSpec(structure_copy(h), dict(h.state_dict())) for t, h in heads.items()}
    >>> x = {t: inputs for t, (inputs, _) in data.items()}
    >>> targets = {t: teacher_targets(skeleton, experts[t].state_dict(), specs[t], x[t]) for t in x}
    >>> logits, features = targets["task0"]
    >>> logits.shape, features.shape
    (torch.Size([24, 3]), torch.Size([24, 8]))
    """
    logits, feats = [], []
    device = next(iter(state.values())).device
    for i in range(0, len(x), batch_size):
        xb = to_device(x[i : i + batch_size], device)
        with _autocast(xb, autocast_dtype):
            z = encode(skeleton, state, xb)
        z = z.to(work_dtype(z))
        feats.append(z)
        logits.append(_head_logits(head, z).to(z.dtype))
    return torch.cat(logits), torch.cat(feats)


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A batch of inputs on the fit device; from host memory through pinned memory, asynchronously.

    Fit inputs stay in host memory (the device holds one batch at a time, not every task's data);
    the copy does not make the host wait for the device's queued work.

    Parameters
    ----------
    x : torch.Tensor
        A batch, anywhere.
    device : torch.device
        The fit device.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> to_device(torch.ones(2), torch.device("cpu")).device
    device(type='cpu')
    """
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def work_dtype(tensor) -> torch.dtype:
    """Features, rotations and losses run in float64 for float64 models, else float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _autocast(x, dtype, cache_enabled=True):
    if dtype is None:
        return torch.autocast(device_type=x.device.type, enabled=False)
    return torch.autocast(device_type=x.device.type, dtype=dtype, cache_enabled=cache_enabled)


def moma_logits(skeleton, theta, head: HeadSpec, q, x, *, autocast_dtype=None):
    """Fit-time forward of one task: ``head(Q · f_θ(x))``; returns ``(logits, rotated features)``.

    ``theta`` is a full state dict (merged weights); ``q`` a rotation matrix or ``None``.

    Parameters
    ----------
    skeleton : torch.nn.Module
        Structure copy of the encoder.
    theta : dict of str to torch.Tensor
        A full (merged) state dict.
    head : HeadSpec
        The task's frozen head.
    q : torch.Tensor of shape (d, d) or None
        ``Q_t``; ``None`` for no rotation.
    x : torch.Tensor
        Inputs of the task.
    autocast_dtype : torch.dtype or None, default=None
        Autocast dtype of the encoder's forward pass.

    Returns
    -------
    logits : torch.Tensor
    rotated_features : torch.Tensor

    Examples
    --------
    >>> import torch
    >>> from momaestimator import toy
    >>> from momaestimator.merging import moma_logits, structure_copy
    >>> from momaestimator.merging.fit import HeadSpec
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=1)
    >>> head = HeadSpec(structure_copy(heads["task0"]), dict(heads["task0"].state_dict()))
    >>> x = data["task0"][0]
    >>> logits, z = moma_logits(structure_copy(pre), pre.state_dict(), head, torch.eye(8), x)
    >>> torch.allclose(logits, heads["task0"](pre(x)), atol=1e-5)
    True
    """
    with _autocast(x, autocast_dtype):
        z = encode(skeleton, theta, x)
    z = z.to(work_dtype(z))
    if q is not None:
        z = z @ q.T
    return _head_logits(head, z), z


def merged_state(theta0, tau, keep, scaling):
    """The full merged state dict for a fixed boolean mask (``None``: keep all); new tensors throughout."""
    return {
        k: masked_merge(v, tau[k], None if keep is None else keep[k], scaling) if k in tau else v.clone()
        for k, v in theta0.items()
    }


def task_groups(tasks, task_batching) -> list[list[int]]:
    """Task indices per forward/backward pass: all at once, one by one, or ``k`` at a time.

    Parameters
    ----------
    tasks : list of str
        Task names, in order.
    task_batching : {"joint", "sequential"} or int
        ``"joint"`` = every task in one pass, ``"sequential"`` = one task per pass, an int ``k`` =
        ``k`` tasks per pass.

    Returns
    -------
    list of list of int

    Examples
    --------
    >>> task_groups(["a", "b", "c"], 2)
    [[0, 1], [2]]
    >>> task_groups(["a", "b", "c"], "joint"), task_groups(["a", "b"], "sequential")
    ([[0, 1, 2]], [[0], [1]])
    """
    _check_task_batching(task_batching)
    n = len(tasks)
    per_pass = {"joint": n, "sequential": 1}.get(task_batching, task_batching)
    per_pass = max(1, min(int(per_pass), n))
    return [list(range(i, min(i + per_pass, n))) for i in range(0, n, per_pass)]


def pass_plan(sizes, task_batching="sequential", micro_batch_size=None) -> list[list[tuple[int, int, int]]]:
    """The forward/backward passes of one step: ``(task, start, stop)`` slices of the tasks' batches.

    The tasks are grouped by :func:`task_groups`; with ``micro_batch_size`` each group's samples
    (its tasks' batches, in order) are then cut into passes of at most that many samples, a pass
    possibly spanning two tasks. Gradients accumulate over the passes, and each slice's loss is
    weighted by its share of its task's batch, so the step is the same whatever the plan (the
    objectives are means over samples) up to float rounding; only the activation memory (that of
    the largest pass) and the speed differ.

    Parameters
    ----------
    sizes : list of int
        Samples per task per step, in task order.
    task_batching : {"joint", "sequential"} or int, default="sequential"
        Tasks per group (:func:`task_groups`).
    micro_batch_size : int or None, default=None
        Most samples per pass; ``None``: one pass per group.

    Returns
    -------
    list of list of (int, int, int)
        Per pass, the slices ``(task index, start, stop)`` of the tasks' batches it runs.

    Examples
    --------
    >>> pass_plan([4, 4], "sequential")
    [[(0, 0, 4)], [(1, 0, 4)]]
    >>> pass_plan([4, 4], "sequential", micro_batch_size=3)
    [[(0, 0, 3)], [(0, 3, 4)], [(1, 0, 3)], [(1, 3, 4)]]
    >>> pass_plan([4, 4], "joint", micro_batch_size=3)
    [[(0, 0, 3)], [(0, 3, 4), (1, 0, 2)], [(1, 2, 4)]]
    """
    if micro_batch_size is not None:
        _check_count(micro_batch_size, "micro_batch_size", 1)
    sizes = [int(n) for n in sizes]
    plan = []
    for group in task_groups(list(range(len(sizes))), task_batching):
        if micro_batch_size is None:
            plan.append([(i, 0, sizes[i]) for i in group])
            continue
        cap = int(micro_batch_size)
        current, room = [], cap
        for i in group:
            lo = 0
            while lo < sizes[i]:
                hi = min(sizes[i], lo + room)
                current.append((i, lo, hi))
                room -= hi - lo
                lo = hi
                if room == 0:
                    plan.append(current)
                    current, room = [], cap
        if current:
            plan.append(current)
    return plan


@torch.no_grad()
def _refresh_theta(ctx):
    """The merged weights for the current scores, rewritten in place into the persistent leaves."""
    if ctx.mask is None:
        return ctx.fixed_theta
    ctx.threshold.copy_(ctx.mask.threshold())  # in place: captured graphs read this tensor
    ctx.mask.merge_into(ctx.leaves, ctx.theta0, ctx.tau, ctx.cfg.scaling, ctx.threshold)
    return ctx.theta


_GRAPH_WARMUP_STEPS = 2  # eager steps before the passes are captured (buffers and handles exist by then)


class GraphedPass:
    """The encoder's forward and backward of one pass, captured as two CUDA graphs.

    A fit step runs the same passes on fixed-size batches against the same tensors (the merged
    weights are rewritten in place, their gradient buffers are kept), so after the first steps
    each pass is captured once and replayed: one launch instead of one per kernel, which is what
    small passes on a GPU are bound by. The rotation, heads and loss stay eager around it; the
    backward graph accumulates into the merged weights' gradients (several passes) or takes the
    score steps inside the backward pass (one pass), exactly as the eager pass does.

    Parameters
    ----------
    skeleton : torch.nn.Module
        Structure copy of the encoder.
    theta : dict of str to torch.Tensor
        The merged state dict (fixed tensors, updated in place between replays).
    inputs : torch.Tensor
        Static input buffer; copy each batch into it before :meth:`__call__` reads it.
    out_dtype : torch.dtype
        Working dtype of the features.
    autocast_dtype : torch.dtype or None
        Autocast dtype of the forward pass.
    pool : optional
        CUDA graph memory pool shared by the passes of a step (they replay in capture order).
    stream : torch.cuda.Stream, optional
        Stream of the warm-up pass and of the capture; give all passes the same one (each stream
        gets its own library workspaces, which stay allocated).
    """

    def __init__(self, skeleton, theta, inputs, out_dtype, autocast_dtype, *, pool=None, stream=None):
        self.inputs = inputs
        stream = torch.cuda.Stream(device=inputs.device) if stream is None else stream
        self._warm_up(skeleton, theta, autocast_dtype, stream)
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(self.forward_graph, pool=pool, stream=stream):
            with _autocast(inputs, autocast_dtype, cache_enabled=False):
                z = encode(skeleton, theta, inputs)
            z = z.to(out_dtype)
        self.features = z.detach()
        self.grad = torch.zeros_like(self.features)
        if z.requires_grad:
            self.backward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.backward_graph, pool=pool, stream=stream):
                z.backward(self.grad)
        self.anchor = torch.zeros((), device=inputs.device, requires_grad=self.backward_graph is not None)

    def _warm_up(self, skeleton, theta, autocast_dtype, stream):
        # one pass on the capture stream before capturing, as CUDA graphs ask (library handles and
        # workspaces for that stream); the gradient goes to a copy of the inputs only, so nothing
        # the fit learns is touched
        device = self.inputs.device
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            x = self.inputs.clone().float().requires_grad_() if self.inputs.is_floating_point() else None
            with _autocast(self.inputs, autocast_dtype, cache_enabled=False):
                z = encode(skeleton, theta, x.to(self.inputs.dtype) if x is not None else self.inputs)
            if x is not None and z.requires_grad:
                torch.autograd.grad(z.float().sum(), [x])
            del x, z
        torch.cuda.current_stream(device).wait_stream(stream)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The features of ``x`` (differentiable: their backward replays the backward graph)."""
        self.inputs.copy_(x, non_blocking=True)
        return _ReplayPass.apply(self.anchor, self)


class _ReplayPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, graphed):
        ctx.graphed = graphed
        with torch.cuda.device(graphed.inputs.device):  # replay launches on the current device's stream
            graphed.forward_graph.replay()
        return graphed.features.clone()  # the next replay overwrites the static output

    @staticmethod
    def backward(ctx, grad):
        graphed = ctx.graphed
        graphed.grad.copy_(grad)
        with torch.cuda.device(graphed.inputs.device):
            graphed.backward_graph.replay()
        return None, None


def _capture_passes(ctx, batches) -> None:
    """Capture every pass of the step as CUDA graphs (one shared pool, one input buffer per shape).

    A capture that fails (an encoder that synchronises with the host, say) leaves the fit eager.
    """
    items = list(batches.items())
    torch.cuda.empty_cache()  # the eager steps' cached blocks: the graphs get their own pool
    buffers, graphs = {}, []
    current = torch.cuda.current_stream(ctx.device)
    try:
        with torch.cuda.device(ctx.device):  # captures (and their pool) on the fit device, whichever is current
            pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device=ctx.device)
            for segments in ctx.passes:
                first = ctx.x_train[items[segments[0][0]][0]]
                shape = (sum(hi - lo for _, lo, hi in segments), *first.shape[1:])
                key = (shape, first.dtype)
                if key not in buffers:
                    buffers[key] = torch.zeros(shape, dtype=first.dtype, device=ctx.device)
                graphs.append(
                    GraphedPass(
                        ctx.pass_skeleton,
                        ctx.theta,
                        buffers[key],
                        ctx.dtype,
                        ctx.cfg.autocast_dtype,
                        pool=pool,
                        stream=stream,
                    )
                )
    except Exception as exc:  # noqa: BLE001 - any capture failure: fall back to eager passes
        warnings.warn(
            f"CUDA graph capture failed ({type(exc).__name__}: {exc}); fitting without CUDA graphs",
            RuntimeWarning,
            stacklevel=4,
        )
        # torch.cuda.graph's exit ends the capture before it restores the stream: when ending
        # raises, the capture stream stays current; give the device its stream back
        torch.cuda.set_stream(current)
        torch.cuda.synchronize(ctx.device)
        graphs = None
    ctx.graphs = graphs


def train_step(ctx, batches, step):
    """One optimisation step over a batch of every task; returns (total loss, {task: loss}).

    The tasks are run in passes (:func:`pass_plan`); the gradients of the merged weights
    accumulate over the passes and become score gradients once, after the last one (or inside its
    backward, tensor by tensor, when there is a single pass). The step is the same whatever the
    plan, up to float rounding; only the activation memory (one pass's samples) and the speed
    differ. The rotations are computed once per step for all tasks (one batched map) and
    differentiated once, after the passes.
    """
    theta = _refresh_theta(ctx)
    if ctx.use_graphs and ctx.graphs is None and step > _GRAPH_WARMUP_STEPS:
        _capture_passes(ctx, batches)
        ctx.use_graphs = ctx.graphs is not None  # a failed capture is not retried
    graphs = ctx.graphs
    q_all = q_leaf = None
    if ctx.rotations is not None:
        ctx.optimizer.zero_grad(set_to_none=True)
        q_all = ctx.rotations.matrices()
        q_leaf = q_all.detach().requires_grad_()  # the passes' gradients gather here
    items = list(batches.items())
    losses = {}  # task -> detached loss tensor: read once per step (one device sync, not one per pass)
    for p, segments in enumerate(ctx.passes):
        parts = []
        for i, lo, hi in segments:
            x = ctx.x_train[items[i][0]]
            parts.append(x[items[i][1][lo:hi].to(x.device)])
        xs = to_device(parts[0] if len(parts) == 1 else torch.cat(parts), ctx.device)
        if graphs is not None:
            z_all = graphs[p](xs)
        else:
            with _autocast(xs, ctx.cfg.autocast_dtype):
                z_all = encode(ctx.pass_skeleton, theta, xs)
            z_all = z_all.to(ctx.dtype)
        pass_losses, offset = [], 0
        for i, lo, hi in segments:
            task, idx = items[i]
            z = z_all[offset : offset + hi - lo]
            offset += hi - lo
            sel = idx[lo:hi].to(ctx.device)
            if q_leaf is not None:
                z = z @ q_leaf[i].T
            t_logits, t_feats = ctx.targets_train[task]
            loss = ctx.loss_fn(_head_logits(ctx.heads[task], z), t_logits[sel], z, t_feats[sel])
            if hi - lo != len(idx):  # a slice of the task's batch: its share of the batch mean
                loss = loss * ((hi - lo) / len(idx))
            pass_losses.append((task, loss))
        if len(ctx.passes) == 1:  # its backward steps the mask scores (see fit_moma): check first
            _check_finite(dict(pass_losses), step)
        sum(loss for _, loss in pass_losses).backward()
        for task, loss in pass_losses:
            losses[task] = losses[task] + loss.detach() if task in losses else loss.detach()
        del z_all, z, pass_losses, loss
    if len(ctx.passes) > 1:
        _check_finite(losses, step)  # before any parameter moves
    if ctx.mask is not None and len(ctx.passes) > 1:
        _step_all_scores(ctx)
    if q_all is not None:
        q_all.backward(q_leaf.grad)
        ctx.optimizer.step()
    values = torch.stack(list(losses.values())).tolist()
    losses = dict(zip(losses, values))
    return sum(values), losses


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (Linux), or ``None`` where there is no such function."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap pages that freed tensors left behind back to the operating system.

    glibc keeps freed blocks of a few MB (the size of one encoder weight) in its heap; between
    steps that memory is free but still counted in the resident set. ``malloc_trim(0)`` returns it;
    elsewhere this does nothing.

    Examples
    --------
    >>> release_free_memory()
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ScoreAdam:
    """Adam over the mask scores, steppable one tensor at a time or all tensors in one fused call.

    The same update as ``torch.optim.Adam(scores, lr, fused=True)`` (through
    ``torch.optim.adam.adam``), with the state kept in plain lists so that a single tensor can
    be stepped inside backward (as soon as its gradient exists) without per-call optimizer
    overhead, and all tensors at once with one multi-tensor kernel.

    Parameters
    ----------
    params : list of torch.Tensor
        The score tensors (updated in place).
    lr : float
        Learning rate.
    betas : tuple of float, default=(0.9, 0.999)
    eps : float, default=1e-8

    Examples
    --------
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(3))
    >>> opt = ScoreAdam([p], lr=0.1)
    >>> opt.step([0], [torch.tensor([1.0, -1.0, 0.0])])
    >>> p.detach()
    tensor([-0.1000,  0.1000,  0.0000])
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    @torch.no_grad()
    def step(self, indices, grads) -> None:
        """One Adam step of the tensors ``indices`` with gradients ``grads`` (same order).

        Parameters
        ----------
        indices : list of int
            Which score tensors.
        grads : list of torch.Tensor
            Their gradients (float32, same shapes).
        """
        grads = list(grads)
        if len(grads) != len(indices):
            raise ValueError(f"{len(indices)} score tensors but {len(grads)} gradients")
        for i, g in zip(indices, grads):
            if g.shape != self.params[i].shape or g.dtype != self.params[i].dtype:
                raise ValueError(
                    f"the gradient of score tensor {i} is {g.dtype} {tuple(g.shape)}, the tensor "
                    f"{self.params[i].dtype} {tuple(self.params[i].shape)}"
                )
        functional_adam(
            [self.params[i] for i in indices],
            grads,
            [self.exp_avgs[i] for i in indices],
            [self.exp_avg_sqs[i] for i in indices],
            [],
            [self.steps[i] for i in indices],
            fused=True,
            amsgrad=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=self.lr,
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
        )


def _step_scores(ctx, i, grad_merged):
    """Turn one merged tensor's gradient into its scores' gradient and take their Adam step.

    On the CPU a float32 gradient (dropped right after) is overwritten in place and the sigmoid
    goes to the fit's scratch buffer: no new tensors.
    """
    k = ctx.mask.names[i]
    args = (grad_merged, ctx.mask.scores[i], ctx.threshold, ctx.tau[k], ctx.cfg.scaling)
    if ctx.scratch is not None and grad_merged.dtype == torch.float32:
        grad = score_gradient(*args, out=grad_merged, buffer=ctx.scratch)
    else:
        grad = score_gradient(*args)
    ctx.score_optimizer.step([i], [grad])


def _step_all_scores(ctx):
    """After several passes: score gradients from the accumulated gradients, then one fused step.

    Where the merged weights are float32 (like the scores) the score gradient is written over
    the accumulated gradient, so all tensors step in one multi-tensor call with no new memory;
    otherwise tensor by tensor.
    """
    indices, grads = [], []
    for i, w in enumerate(ctx.holders):
        if w.grad is None:
            continue
        if w.grad.dtype != torch.float32:
            _step_scores(ctx, i, w.grad)
            continue
        k = ctx.mask.names[i]
        score_gradient(
            w.grad, ctx.mask.scores[i], ctx.threshold, ctx.tau[k], ctx.cfg.scaling, out=w.grad, buffer=ctx.scratch
        )
        indices.append(i)
        grads.append(w.grad)
    if indices:
        ctx.score_optimizer.step(indices, grads)
    for w in ctx.holders:
        if w.grad is not None:
            w.grad.zero_()  # keep the buffer: no encoder-sized allocation per step


def _step_in_backward(ctx, i):
    def hook(leaf):
        _step_scores(ctx, i, leaf.grad)
        leaf.grad = None  # no gradient buffer survives the backward pass

    return hook


def _check_finite(losses, step):
    finite = torch.stack([v.detach() for v in losses.values()]).isfinite().tolist()  # one device sync
    bad = [t for t, ok in zip(losses, finite) if not ok]
    if bad:
        raise FloatingPointError(
            f"non-finite loss at step {step} (tasks {bad}); lower `lr`/`rotation_lr` or check the inputs"
        )


@torch.no_grad()
def validation_loss(ctx) -> float:
    """Objective on the held-out unlabeled samples (no labels), summed over tasks."""
    if not ctx.x_val:
        return math.nan
    theta = _refresh_theta(ctx)  # the mask binary() returns
    total = 0.0
    q_all = ctx.rotations.matrices() if ctx.rotations is not None else None
    for i, task in enumerate(ctx.tasks):
        q = q_all[i] if q_all is not None else None
        logits, feats = [], []
        for start in range(0, len(ctx.x_val[task]), 256):  # batches: no activation spike on large sets
            x = to_device(ctx.x_val[task][start : start + 256], ctx.device)
            out = moma_logits(ctx.eval_skeleton, theta, ctx.heads[task], q, x, autocast_dtype=ctx.cfg.autocast_dtype)
            logits.append(out[0])
            feats.append(out[1])
        t_logits, t_feats = ctx.targets_val[task]
        total += float(ctx.loss_fn(torch.cat(logits), t_logits, torch.cat(feats), t_feats))
    return total


@torch.no_grad()
def _procrustes_start(ctx) -> torch.Tensor:
    """Per task, the rotation from the start's normalised features of its fit inputs to its expert's."""
    theta, autocast = _refresh_theta(ctx), ctx.cfg.autocast_dtype
    out = []
    for task in ctx.tasks:
        feats = []
        for start in range(0, len(ctx.x_train[task]), 256):
            x = to_device(ctx.x_train[task][start : start + 256], ctx.device)
            _, z = moma_logits(ctx.eval_skeleton, theta, ctx.heads[task], None, x, autocast_dtype=autocast)
            feats.append(z)
        out.append(orthogonal_procrustes(torch.cat(feats), ctx.targets_train[task][1], normalize=True))
    return torch.stack(out)


def recomputed_blocks(encoder, gradient_checkpointing=False, recompute_merged_weights=False):
    """The blocks whose activations, and those whose merged weights, a fit recomputes.

    Parameters
    ----------
    encoder : torch.nn.Module
        The encoder (or its structure copy); only read.
    gradient_checkpointing : bool, type or tuple of types, default=False
        As :func:`.checkpointing.find_blocks` takes it.
    recompute_merged_weights : bool, default=False
        Merge inside blocks: those of ``gradient_checkpointing``, else the repeated blocks.

    Returns
    -------
    checkpointed, merged : list of str
        Qualified block names (empty lists for "none").

    Raises
    ------
    TypeError, ValueError
        If a setting is not one of the above, or asks for blocks the encoder does not have.

    Examples
    --------
    >>> import torch
    >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> recomputed_blocks(enc, False, True)
    ([], ['0', '1'])
    """
    if not isinstance(recompute_merged_weights, bool):
        raise TypeError(f"recompute_merged_weights must be True or False, got {recompute_merged_weights!r}")
    checkpointed = find_blocks(encoder, gradient_checkpointing)
    if not recompute_merged_weights:
        return checkpointed, []
    if checkpointed:
        merged = checkpointed
    else:
        try:
            merged = find_blocks(encoder, True)
        except ValueError:
            raise ValueError(
                f"recompute_merged_weights=True: the encoder ({type(encoder).__name__}) has no repeated blocks "
                "(an nn.ModuleList or nn.Sequential of modules of one class holding weights) to merge in; "
                "name the block class(es) with gradient_checkpointing, or pass False"
            ) from None
    _check_no_weight_crosses(encoder, merged)
    return checkpointed, merged


def _check_no_weight_crosses(encoder, blocks) -> None:
    """Refuse a weight that a merged block shares with a module outside it (weight tying): the block
    makes its merged weights only while it runs, so the other use would find none.
    """
    names_of = {}
    for name, p in encoder.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for names in names_of.values():
        homes = {next((b for b in blocks if _within(n, [b])), None) for n in names}
        if len(homes) > 1:
            raise ValueError(
                f"recompute_merged_weights=True: the weight {names[0]!r} is shared by {names}, across the "
                "boundary of a block that merges its own weights (the other use would find none); "
                "fit this encoder with recompute_merged_weights=False"
            )


class _PlaceholderGuard(torch.overrides.TorchFunctionMode):
    """Raise where an operation mixes a placeholder (``meta``) tensor with real data.

    On the CPU some operations (``F.linear`` in torch 2.14) return uninitialised memory for a meta
    weight and a real input instead of raising; the fit's first passes run under this guard so
    that a use of placeholder weights fails loudly rather than training on garbage.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if len(tensors) > 1:
            meta = [t.is_meta for t in tensors]
            if any(meta) and not all(meta):
                raise RuntimeError(f"{getattr(func, '__name__', func)} got a meta tensor together with real data")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _placeholders_explained(ctx):
    """With merged weights made in the blocks: say what an error about ``meta`` tensors means.

    Until the first training step is done (``ctx.guard_placeholders``), passes run under
    :class:`_PlaceholderGuard`.
    """
    guard = _PlaceholderGuard() if ctx.merged_in_blocks and ctx.guard_placeholders else contextlib.nullcontext()
    try:
        with guard:
            yield
    except (RuntimeError, NotImplementedError) as exc:
        if not ctx.merged_in_blocks or "meta" not in str(exc):
            raise
        raise RuntimeError(
            "recompute_merged_weights=True: the encoder used a block's weights outside that block's forward "
            "(weight tying across modules, say), where the fit has only placeholders (meta tensors); "
            f"fit it with recompute_merged_weights=False ({type(exc).__name__}: {exc})"
        ) from exc


class _Context:
    """Everything one fit needs, gathered so the step functions stay short."""


def fit_moma(
    skeleton,
    theta0,
    tau,
    heads,
    x_train,
    targets_train,
    x_val,
    targets_val,
    cfg: FitConfig,
    *,
    generator: torch.Generator,
    progress=None,
) -> FitResult:
    """Learn the mask scores and rotations; return the binary mask and rotation matrices.

    Parameters
    ----------
    skeleton : torch.nn.Module
        Structure copy of the encoder (see :func:`.functional.structure_copy`).
    theta0, tau : dict of str to torch.Tensor
        Pretrained state dict and multi-task vector ``τ_MT`` (float entries), on the fit device.
    heads : dict of str to HeadSpec
        Frozen heads, in task order.
    x_train : dict of str to torch.Tensor
        Unlabeled fit inputs per task, on any device (host memory is fine: one batch at a time
        moves to the fit device).
    targets_train : dict of str to (logits, features)
        The experts' outputs on ``x_train`` (:func:`teacher_targets`).
    x_val : dict of str to torch.Tensor
        Held-out inputs per task (may be empty), used only for early stopping.
    targets_val : dict of str to (logits, features)
        The experts' outputs on ``x_val``.
    cfg : FitConfig
    generator : torch.Generator
        Source of all randomness (batch sampling, tie-breaking).
    progress : callable, optional
        Wraps the step iterator (e.g. ``tqdm``).

    Returns
    -------
    FitResult

    Examples
    --------
    >>> import torch
    >>> from momaestimator import toy
    >>> from momaestimator.merging import FitConfig, fit_moma, multitask_vector, structure_copy, teacher_targets
    >>> from momaestimator.merging.fit import HeadSpec
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> theta0 = pre.state_dict()
    >>> tau = multitask_vector(theta0, {t: e.state_dict() for t, e in experts.items()})
    >>> skeleton = structure_copy(pre)
    >>> specs = {t: HeadSpec(structure_copy(h), dict(h.state_dict())) for t, h in heads.items()}
    >>> x = {t: inputs for t, (inputs, _) in data.items()}
    >>> targets = {t: teacher_targets(skeleton, experts[t].state_dict(), specs[t], x[t]) for t in x}
    >>> cfg = FitConfig(sparsity=0.2, n_steps=3)
    >>> gen = torch.Generator().manual_seed(0)
    >>> result = fit_moma(skeleton, theta0, tau, specs, x, targets, {}, {}, cfg, generator=gen)
    >>> result.n_iter, sorted(result.rotations)
    (3, ['task0', 'task1'])
    """
    ctx = _Context()
    ctx.cfg, ctx.skeleton, ctx.theta0, ctx.tau, ctx.heads = cfg, skeleton, theta0, tau, heads
    ctx.tasks = list(heads)
    ctx.x_train, ctx.targets_train, ctx.x_val, ctx.targets_val = x_train, targets_train, x_val, targets_val
    ctx.loss_fn = OBJECTIVES[cfg.objective][0]
    device = ctx.device = next(iter(theta0.values())).device
    _, feats = next(iter(targets_train.values()))
    dim, ctx.dtype = feats.shape[1], feats.dtype

    ctx.mask = GlobalMask(tau, cfg.sparsity, generator=generator).to(device) if cfg.use_mask else None
    ctx.rotations = (
        Rotations(len(ctx.tasks), dim, method=cfg.rotation_map, device=device, dtype=ctx.dtype)
        if cfg.use_rotations
        else None
    )
    ctx.fixed_theta = None if ctx.mask is not None else merged_state(theta0, tau, None, cfg.scaling)
    sizes = [min(cfg.batch_size, len(x_train[t])) for t in ctx.tasks]  # the same every step
    ctx.passes = pass_plan(sizes, cfg.task_batching, cfg.micro_batch_size)
    # One set of merged weights for the whole fit, rewritten in place every step: leaves whose
    # gradients become score gradients (straight-through, see `score_gradient`). With
    # `recompute_merged_weights` the blocks' entries are left out: each block merges its own as it
    # runs (and again in backward), and their gradients gather in the scores' own `.grad`.
    ctx.leaves, ctx.theta, ctx.threshold, ctx.holders, block_merge = {}, theta0, None, [], None
    recompute = cfg.recompute_merged_weights if cfg.use_mask else False  # nothing to merge without a mask
    ckpt_blocks, merge_blocks = recomputed_blocks(skeleton, cfg.gradient_checkpointing, recompute)
    if ctx.mask is not None:
        # weights are differentiated; float buffers (BatchNorm's running statistics) are merged and
        # masked too but take no gradient (batch_norm refuses one): their scores keep their start
        weights = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
        ctx.threshold = ctx.mask.threshold().clone()
        in_blocks = {k for k in ctx.mask.names if k in weights and _within(k, merge_blocks)}
        scores = dict(zip(ctx.mask.names, ctx.mask.scores))
        ctx.leaves = {
            k: torch.empty_like(tau[k]).requires_grad_(k in weights) for k in ctx.mask.names if k not in in_blocks
        }
        ctx.holders = [scores[k] if k in in_blocks else ctx.leaves[k] for k in ctx.mask.names]
        ctx.theta = {**{k: v for k, v in theta0.items() if k not in in_blocks}, **ctx.leaves}
        block_merge = BlockMerge({k: scores[k] for k in in_blocks}, theta0, tau, cfg.scaling, ctx.threshold)
    elif ctx.fixed_theta is not None:
        ctx.theta = ctx.fixed_theta
    # the training passes' encoder: with checkpointing, its blocks recompute their activations in
    # backward (teacher targets run without gradients on the plain skeleton); with merging in the
    # blocks, evaluation runs on it too (the blocks' merged weights exist nowhere else)
    ctx.pass_skeleton = ctx.eval_skeleton = skeleton
    ctx.merged_in_blocks = block_merge is not None and bool(block_merge.scores)
    ctx.guard_placeholders = True  # until the first training step is done (see _placeholders_explained)
    if ctx.merged_in_blocks:
        ctx.pass_skeleton = ctx.eval_skeleton = recompute_blocks(
            skeleton, merge_blocks, activations=bool(ckpt_blocks), merge=block_merge
        )
    elif ckpt_blocks:
        ctx.pass_skeleton = recompute_blocks(skeleton, ckpt_blocks)
    # CUDA graphs: worth it only with steps left to replay after the eager warm-up steps
    ctx.use_graphs = cfg.cuda_graphs and device.type == "cuda" and cfg.n_steps > _GRAPH_WARMUP_STEPS + 1
    ctx.graphs = None
    # Fused Adam updates in place without full-size temporaries; one optimiser per score tensor so
    # that each tensor's scores can be stepped as soon as their gradient exists. With a single pass
    # per step that happens inside backward, and the gradient is dropped at once: no encoder-sized
    # gradient buffer ever exists. With several passes the merged weights' gradients accumulate
    # (one encoder-sized buffer, kept across steps) and are turned into score steps after the last.
    ctx.optimizer = None
    if ctx.rotations is not None:
        ctx.optimizer = torch.optim.Adam(list(ctx.rotations.parameters()), lr=cfg.rotation_lr, fused=True)
    ctx.score_optimizer = None
    hooks = []
    if ctx.mask is not None:
        ctx.score_optimizer = ScoreAdam(ctx.mask.scores, lr=cfg.lr)
        if len(ctx.passes) == 1:
            hooks = [
                w.register_post_accumulate_grad_hook(_step_in_backward(ctx, i))
                for i, w in enumerate(ctx.holders)
                if w.requires_grad
            ]
    ctx.learns = ctx.mask is not None or ctx.rotations is not None
    ctx.trim_heap = device.type == "cpu"
    # CPU: one scratch tensor (the largest score tensor's size) for the score gradients' sigmoid
    ctx.scratch = None
    if ctx.mask is not None and device.type == "cpu":
        ctx.scratch = torch.empty(max((s.numel() for s in ctx.mask.scores), default=0), dtype=torch.float32)
    if ctx.trim_heap:  # what building τ_MT and the scores left behind
        release_free_memory()

    def snapshot():  # the binary mask (1 byte per weight), not the scores: all the result needs
        return (
            {k: v.cpu() for k, v in ctx.mask.binary().items()} if ctx.mask is not None else None,
            [g.detach().clone() for g in ctx.rotations.parameters()] if ctx.rotations is not None else None,
        )

    if ctx.rotations is not None and cfg.rotation_init == "procrustes":
        with _placeholders_explained(ctx):
            ctx.rotations.set_base(_procrustes_start(ctx))
    history = []
    # without held-out data the last state is kept, so no copy of the start state is needed
    with _placeholders_explained(ctx):
        best_loss, best_state, best_step = validation_loss(ctx), (snapshot() if ctx.x_val else None), 0
    n_iter, interrupted = 0, False
    steps = range(1, cfg.n_steps + 1) if ctx.learns else range(0)
    if progress is not None:
        steps = progress(steps)
    start = time.perf_counter()
    try:
        for step in steps:
            # without replacement: a step sees min(batch_size, n) distinct samples of each task
            batches = {t: torch.randperm(len(x_train[t]), generator=generator)[: cfg.batch_size] for t in ctx.tasks}
            with _placeholders_explained(ctx):
                loss, per_task = train_step(ctx, batches, step)
            ctx.guard_placeholders = False  # every pass has run once without touching a placeholder
            if ctx.trim_heap:
                release_free_memory()
            n_iter = step
            record = {"step": step, "loss": loss, "per_task_loss": per_task, "seconds": time.perf_counter() - start}
            if device.type == "cuda":
                record["graphed"] = ctx.graphs is not None
            if ctx.x_val and (step % cfg.eval_every == 0 or step == cfg.n_steps):
                with _placeholders_explained(ctx):
                    val = validation_loss(ctx)
                record["valid_loss"] = val
                if val < best_loss:
                    best_loss, best_state, best_step = val, snapshot(), step
            history.append(record)
    except KeyboardInterrupt:
        interrupted = True
        if not history:
            raise
    for h in hooks:
        h.remove()
    ctx.graphs = None  # releases the graphs' memory pool
    for w in ctx.holders:  # free the gradient buffers and merged weights before the final mask
        w.grad = None
    ctx.leaves = ctx.theta = ctx.holders = None
    if not ctx.x_val:
        best_state, best_step = (None, None), n_iter

    best_mask, gens = best_state
    with torch.no_grad():
        if ctx.mask is not None:
            mask = best_mask if best_mask is not None else {k: v.cpu() for k, v in ctx.mask.binary().items()}
        else:
            mask = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in tau.items()}
        if ctx.rotations is not None:
            for g, s in zip(ctx.rotations.parameters(), gens or ()):
                g.copy_(s)
            # the learned generators' rotations in float64 (orthogonal to its rounding), then the
            # working dtype: a float32 exponential with several squarings drifts from orthogonal
            q_all = ctx.rotations.matrices(torch.float64, "cpu").to(ctx.rotations.generators[0].dtype)
            rotations = {t: q_all[i].detach() for i, t in enumerate(ctx.tasks)}
        else:
            rotations = {t: torch.eye(dim, dtype=ctx.dtype) for t in ctx.tasks}
    return FitResult(
        mask=mask, rotations=rotations, history=history, n_iter=n_iter, best_step=best_step, interrupted=interrupted
    )
