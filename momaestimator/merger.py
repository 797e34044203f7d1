"""``MOMAMerger``: the scikit-learn estimator over the pure-torch MOMA core.

This is the only module that knows about scikit-learn estimators. It validates, converts the
user's inputs, and calls :mod:`momaestimator.merging` for every piece of tensor work.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import _validation as V
from ._display import MODULE_PARAMS, ModuleSummaryReprMixin
from ._io import atomic_write
from .data import materialize_inputs, split_inputs_and_labels
from .merging.fit import FitConfig, HeadSpec, fit_moma, merged_state, recomputed_blocks, teacher_targets
from .merging.functional import absorb_heads, clone_with_state, structure_copy, with_autograd
from .merging.task_arithmetic import _ties_vector, multitask_vector
from .merging.task_vectors import as_state_dict
from .metrics import _accuracy_of_sources, check_scoring_inputs
from .models import MergedModel

__all__ = ["MOMAMerger"]

_FITTED = (
    "tasks_",
    "mask_",
    "rotations_",
    "history_",
    "n_iter_",
    "best_step_",
    "feature_dim_",
    "interrupted_",
    "merge_params_",
    "extra_params_",
)
_MANY_SAMPLES = 10_000  # fit inputs of one task above this: a warning (MOMA needs a few per class)
_MERGE_PARAMS = ("base", "scaling", "top_k")  # what the base merge (and the absorbed encoder) depends on


def _is_lazy(source) -> bool:
    """A checkpoint path or a loader: read each time it is needed, never kept."""
    return isinstance(source, (str, os.PathLike)) or V.is_loader(source)


def _load_state(source, task, pre_state, aliases=frozenset()):
    """A fine-tuned encoder's state dict from a module, a state dict, a checkpoint path or a loader.

    In the pretrained encoder's terms: the names of its tied tensors other than the first
    (``aliases``) are dropped, and floating entries of another dtype are cast to its dtype (a
    half-precision checkpoint against a float32 encoder, say).
    """
    state = _read_state(source, task, pre_state)
    out = {}
    for k, v in state.items():
        if k in aliases:
            continue
        ref = pre_state.get(k)
        if ref is not None and v.dtype != ref.dtype and v.is_floating_point() and ref.is_floating_point():
            v = v.to(ref.dtype)
        out[k] = v
    return out


def _read_state(source, task, pre_state):
    name = f"finetuned_encoders[{task!r}]"
    if V.is_loader(source):
        loaded = source()
        if not isinstance(loaded, (torch.nn.Module, Mapping, str, os.PathLike)):
            raise TypeError(
                f"{name} is a loader that returned a {type(loaded).__name__}; it must return a "
                "torch.nn.Module, a state dict or a checkpoint path"
            )
        source = loaded
    if isinstance(source, (str, os.PathLike)):
        # any checkpoint file the checkpoints package reads: a bare tower's state dict, a wrapped
        # one (``model.visual.*``), a release's whole-object pickle; the tower's entries only
        from .checkpoints import matching_state

        return as_state_dict(matching_state(source, pre_state), name=name)
    return as_state_dict(source, name=name)


def _add_task_vector(tau, state, base_state) -> None:
    """``τ += state − base_state`` entry by entry, in place (Task Arithmetic's sum, one expert at a time)."""
    for k in tau:
        tau[k] += state[k].to(base_state[k].device) - base_state[k]


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - pickling a local class raises several error types
        return False
    return True


class MOMAMerger(ModuleSummaryReprMixin, BaseEstimator):
    """Merge fine-tuned encoders with MOMA: a learned global mask and per-task rotations, absorbed.

    MOMA (Masked Orthogonal Matrix Alignment) starts from a base merge
    ``θ_0 + λ·τ_MT`` of the fine-tuned encoders, then learns from a few unlabeled samples per
    task (i) one binary mask ``m`` over the multi-task vector ``τ_MT``, shared by all tasks, and
    (ii) one rotation ``Q_t`` per task between the merged encoder and that task's frozen head,
    by matching the fine-tuned experts' predictions (KL divergence). :meth:`transform` absorbs
    both into existing weights — ``θ* = θ_0 + λ (m ⊙ τ_MT)``, ``W_t* = W_t Q_t`` — so the result
    has exactly the parameters of one encoder plus the original heads.

    Parameters
    ----------
    pretrained_encoder : torch.nn.Module
        The pretrained encoder ``θ_0`` (e.g. an open_clip image tower). Never modified.
    finetuned_encoders : dict of str to torch.nn.Module, or list
        One fine-tuned encoder per task, same architecture. Modules, state dicts, checkpoint
        paths, or loaders (zero-argument callables returning a module, a state dict or a path);
        paths and loaders are read one at a time, each time they are needed, and not kept, so no
        expert stays in memory. A list names tasks ``"0"``, ``"1"``, ...
    heads : dict of str to torch.nn.Module, or list
        One frozen classification head per task, same keys: ``nn.Linear``, :class:`LinearHead`
        (normalising), any module with a 2-D ``weight``, or an ``nn.Sequential`` starting with one.
    sparsity : float, default=0.1
        Fraction of ``τ_MT``'s non-zero entries the binary mask removes, in [0, 1) (entries that
        are zero — no expert moved them, or TIES trimmed them — are the same kept or removed,
        and are never cut). With 0 the mask keeps everything (only the rotations are learned).
    base : {"task_arithmetic", "ties"}, default="task_arithmetic"
        The base merge that builds ``τ_MT``.
    scaling : float, default=0.3
        λ, the scale of the multi-task vector (the field's default for 8 CLIP tasks).
    top_k : float, default=0.2
        TIES base only: fraction of each task vector kept.
    learn_mask : bool, default=True
        Learn the mask (False: mask-free, rotation-only ablation).
    learn_rotations : bool, default=True
        Learn the rotations (False: mask-only ablation).
    objective : {"kl", "feature", "entropy"}, default="kl"
        ``kl``: KL from each expert's predictions; ``feature``: align normalised features with the
        expert's; ``entropy``: prediction entropy (needs no expert).
    n_steps : int, default=100
        Optimisation steps; each step sees ``batch_size`` samples of every task.
    lr : float, default=0.05
        Adam learning rate of the mask scores.
    rotation_lr : float, default=1e-3
        Adam learning rate of the rotation generators (much lower than ``lr``: see the user guide).
    batch_size : int, default=16
        Samples per task per step.
    max_samples_per_task : int or None, default=None
        Read at most this many samples of each task's fit inputs: the first ones, in the order
        the input gives them (a shuffled loader: a random subset), and stop reading there. ``fit``
        keeps every sample it reads in memory (and computes the experts' logits on all of them),
        while MOMA needs a few per class: cap it when you pass a whole training loader. ``None``
        reads everything (with a warning above 10,000 samples of a task).
    validation_fraction : float, default=0.0
        Share of each task's *unlabeled* fit data held out; the state with the lowest held-out
        objective is kept (early stopping without labels). 0 (default) fits on every sample and
        keeps the last state: on the embedded benchmark's few-shot protocol (10 samples per task
        held out at 0.2) early stopping was noise — it kept the starting merge in 4 of 15 fits —
        and cost 1 point of accuracy; with hundreds of samples per task it made no difference.
    eval_every : int, default=10
        Steps between two held-out evaluations.
    rotation_map : {"exp", "cayley"}, default="exp"
        How a skew-symmetric generator becomes a rotation.
    rotation_init : {"identity", "procrustes"}, default="identity"
        Where each rotation starts: the identity (the paper's start), or the closed-form rotation
        that best maps the start's normalised features of the task's fit inputs onto its expert's
        (orthogonal Procrustes, the identity outside the span of few-shot features); the fit
        then learns on from there.
    precision : {None, "bf16", "fp16"}, default=None
        Autocast dtype of the encoder's forward pass (fit and score); mask scores and rotations
        stay float32. Needs a float32 encoder, or one already holding weights in that dtype
        (open_clip's ``precision="bf16"`` models); a float64 or other half-precision encoder is
        refused before any work.
    task_batching : {"joint", "sequential"} or int, default="sequential"
        Tasks per forward/backward pass. ``"joint"``: every task's batch in one pass (activation
        memory grows with the number of tasks). ``"sequential"``: one task per pass; an int ``k``:
        ``k`` tasks per pass. Gradients accumulate over the passes of a step, so every choice
        takes the same step up to float rounding; several passes keep the activations of one
        pass only, at the price of one encoder-sized gradient buffer (see the scaling guide).
        With one task per pass (``"sequential"`` or ``1``) tasks' inputs may differ in shape.
    micro_batch_size : int or None, default=None
        At most this many samples per forward/backward pass: each pass's batches are cut into
        micro-batches whose gradients accumulate (each weighted by its share of its task's batch,
        so the step stays the same up to float rounding). Bounds the activation memory by that of
        ``micro_batch_size`` samples whatever ``batch_size`` and ``task_batching`` are; smaller
        passes run less efficiently, most of all on a GPU. ``None`` cuts nothing.
    gradient_checkpointing : bool, nn.Module subclass or tuple of them, default=False
        Keep only each encoder block's input during a pass and recompute the block's activations
        in the backward pass: the same step (the same numbers), about one more forward pass of
        compute, and the activations a pass holds fall from all blocks' to one block's (a 64-image
        ViT-B/32 pass keeps 177 MB instead of 1.87 GB). ``True`` recomputes the repeated blocks —
        the children of an ``nn.ModuleList``/``nn.Sequential`` of one class, such as open_clip's
        ``transformer.resblocks``; a class or tuple of classes names the blocks. It lets larger
        passes (``task_batching``, ``micro_batch_size``) or larger encoders fit; see the scaling
        guide (on an H100, ``task_batching=4`` with it stepped ViT-B/32 at batch 16 faster than the
        default and with less memory). The user's encoder is not modified (the fit patches its own
        weightless copy).
    recompute_merged_weights : bool, default=False
        Do not keep a merged copy of the encoder for the whole fit: each block (those of
        ``gradient_checkpointing``, else the repeated blocks) computes its merged weights
        ``θ_0 + λ (m ⊙ τ)`` from the mask scores as it runs, and again in the backward pass where
        they are needed (the same bits); their gradient goes straight to the scores' gradient
        buffer. One encoder's bytes less at its peak for a little more arithmetic over the weights
        (two merges per pass instead of one per step); the same step. The encoder must use each
        block's weights only inside that block's forward (true of open_clip, timm and torchvision
        models): a weight shared across a block's boundary is refused before any work, and any
        other use outside fails loudly in the first passes (the weights are placeholders there).
        Ignored when ``learn_mask=False``. See the scaling guide.
    cuda_graphs : bool, default=True
        On a CUDA device, capture each pass's encoder forward and backward as CUDA graphs after
        two eager steps and replay them for the remaining steps (same computation, one launch per
        pass instead of one per kernel). An encoder that cannot be captured (one that synchronises
        with the host) is fitted eagerly, with a warning. Ignored on other devices. Set it to False
        when several fits share one GPU from threads of one process (a capture forbids other
        threads' unsafe CUDA calls meanwhile) or near the device's memory limit (the graphs' memory
        pool adds to the allocator's cache; see the scaling guide).
    device : str or torch.device, default="cpu"
        Where fitting and scoring run; the user's modules stay where they are.
    random_state : int, RandomState instance or None, default=None
        Seeds batch sampling, the hold-out split and tie-breaking; an int gives identical CPU results
        for inputs read in the same order. A ``DataLoader(shuffle=True)`` draws its order from
        torch's global generator, which fit never seeds (threads share it): give such a loader its
        own, ``generator=torch.Generator().manual_seed(0)``, for repeatable fits.
    verbose : int or bool, default=0
        Show a progress bar when > 0 (or ``True``).

    Attributes
    ----------
    tasks_ : list of str
        Task names, in order.
    mask_ : dict of str to torch.BoolTensor
        The learned binary mask over ``τ_MT`` (``True`` = kept), per state-dict entry.
    rotations_ : dict of str to torch.Tensor
        ``Q_t`` (``d × d``, orthogonal) per task.
    history_ : list of dict
        One record per step: ``step``, ``loss``, ``per_task_loss``, ``seconds`` (cumulative: the
        time from the start of the first step to the end of this one, held-out evaluations
        included; differences give step times), ``valid_loss`` when evaluated, and on a CUDA
        device ``graphed`` (whether the step replayed CUDA graphs).
    n_iter_ : int
        Steps run.
    best_step_ : int
        Step whose state was kept (held-out objective); 0 = the start: the base merge with the
        smallest-magnitude ``sparsity`` fraction of ``τ_MT`` removed.
    feature_dim_ : int
        Encoder output dimension.
    interrupted_ : bool
        Whether fitting was stopped by ``KeyboardInterrupt``. After at least one step, ``fit``
        keeps the best state so far (the merger is fitted and usable) and then re-raises the
        interrupt, so that it still stops a search or a script; before the first step the merger
        stays unfitted.
    extra_params_ : int
        Parameters the merged model needs beyond one encoder and the original heads: always 0
        (the attribute every baseline reports too).
    merge_params_ : dict
        ``base``, ``scaling`` and ``top_k`` as ``fit`` used them. :meth:`transform`, :meth:`score`
        and :meth:`merged_state_dict` use these, so ``set_params`` after ``fit`` changes nothing
        until the next ``fit`` (the mask and rotations were learned for these values).

    Examples
    --------
    >>> from momaestimator import MOMAMerger, toy
    >>> pre, experts, heads, X = toy.make_problem(n_tasks=2, random_state=0)
    >>> merger = MOMAMerger(pre, experts, heads, n_steps=5, random_state=0).fit(X)
    >>> model = merger.transform()
    >>> sum(p.numel() for p in model.parameters()) == toy.count_parameters(pre, heads)
    True
    """

    def __init__(
        self,
        pretrained_encoder=None,
        finetuned_encoders=None,
        heads=None,
        *,
        sparsity=0.1,
        base="task_arithmetic",
        scaling=0.3,
        top_k=0.2,
        learn_mask=True,
        learn_rotations=True,
        objective="kl",
        n_steps=100,
        lr=0.05,
        rotation_lr=1e-3,
        batch_size=16,
        max_samples_per_task=None,
        validation_fraction=0.0,
        eval_every=10,
        rotation_map="exp",
        rotation_init="identity",
        precision=None,
        task_batching="sequential",
        micro_batch_size=None,
        gradient_checkpointing=False,
        recompute_merged_weights=False,
        cuda_graphs=True,
        device="cpu",
        random_state=None,
        verbose=0,
    ):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads
        self.sparsity = sparsity
        self.base = base
        self.scaling = scaling
        self.top_k = top_k
        self.learn_mask = learn_mask
        self.learn_rotations = learn_rotations
        self.objective = objective
        self.n_steps = n_steps
        self.lr = lr
        self.rotation_lr = rotation_lr
        self.batch_size = batch_size
        self.max_samples_per_task = max_samples_per_task
        self.validation_fraction = validation_fraction
        self.eval_every = eval_every
        self.rotation_map = rotation_map
        self.rotation_init = rotation_init
        self.precision = precision
        self.task_batching = task_batching
        self.micro_batch_size = micro_batch_size
        self.gradient_checkpointing = gradient_checkpointing
        self.recompute_merged_weights = recompute_merged_weights
        self.cuda_graphs = cuda_graphs
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ sklearn plumbing
    def __sklearn_clone__(self):
        """Clone parameters as scikit-learn does, but share the (read-only) user modules."""
        params = self.get_params(deep=False)
        new = {k: (v if k in MODULE_PARAMS else clone(v, safe=False)) for k, v in params.items()}
        return type(self)(**new)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        tags.input_tags.two_d_array = False
        tags.input_tags.dict = True
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------------ validation
    def _check_params(self):
        V.check_number(self.sparsity, "sparsity", low=0.0, high=1.0, high_open=True)
        V.check_number(self.scaling, "scaling", low=0.0, low_open=True)
        V.check_number(self.top_k, "top_k", low=0.0, high=1.0, low_open=True)
        V.check_number(self.n_steps, "n_steps", low=0, integer=True)
        V.check_number(self.lr, "lr", low=0.0, low_open=True)
        V.check_number(self.rotation_lr, "rotation_lr", low=0.0, low_open=True)
        V.check_number(self.batch_size, "batch_size", low=1, integer=True)
        V.check_number(self.validation_fraction, "validation_fraction", low=0.0, high=1.0, high_open=True)
        V.check_number(self.eval_every, "eval_every", low=1, integer=True)
        V.check_choice(self.base, "base", V.BASES)
        V.check_choice(self.objective, "objective", V.OBJECTIVE_NAMES)
        V.check_random_state(self.random_state)
        V.check_choice(self.rotation_map, "rotation_map", ("exp", "cayley"))
        V.check_choice(self.rotation_init, "rotation_init", ("identity", "procrustes"))
        V.check_choice(self.precision, "precision", list(V.PRECISIONS))
        V.check_task_batching(self.task_batching)
        if self.max_samples_per_task is not None:
            V.check_number(
                self.max_samples_per_task, "max_samples_per_task (None or a positive int)", low=1, integer=True
            )
        if self.micro_batch_size is not None:
            V.check_number(self.micro_batch_size, "micro_batch_size (None or a positive int)", low=1, integer=True)
        for flag in ("learn_mask", "learn_rotations", "recompute_merged_weights", "cuda_graphs"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.verbose, (bool, np.bool_)):  # True/False, as scikit-learn estimators take
            V.check_number(self.verbose, "verbose", low=0, integer=True)
        return V.resolve_device(self.device)

    def _check_models(self, *, values=True, experts=True):
        """Validated ``(tasks, pretrained state, {task: ft source}, {task: head})``.

        ``experts=False`` checks the experts given as modules or state dicts and leaves those given as
        checkpoint paths or loaders to :meth:`_check_experts` (fit checks the data and the heads
        first: reading checkpoints is the slow part).
        """
        if self.pretrained_encoder is None or not isinstance(self.pretrained_encoder, torch.nn.Module):
            raise TypeError(
                f"pretrained_encoder must be a torch.nn.Module, got {type(self.pretrained_encoder).__name__}"
            )
        fts = V.check_task_dict(self.finetuned_encoders, "finetuned_encoders", allow_lazy=True)
        heads = V.check_heads_dict(self.heads)
        tasks = V.check_same_tasks(finetuned_encoders=fts, heads=heads)
        pre_state = as_state_dict(self.pretrained_encoder, name="pretrained_encoder")
        V.check_precision(self.precision, pre_state)
        if values:  # a full pass over every weight: once per fit, not again in transform/score
            V.check_state(pre_state, "pretrained_encoder")
        self._check_experts(fts, pre_state, values=values, lazy=experts)
        return tasks, pre_state, fts, heads

    def _check_experts(self, fts, pre_state, *, values=True, lazy=True, eager=True):
        """Check the experts given in memory (``eager``) and those read from checkpoints or loaders (``lazy``)."""
        for task, src in fts.items():
            if not (lazy if _is_lazy(src) else eager):
                continue
            if isinstance(src, torch.nn.Module) and type(src) is not type(self.pretrained_encoder):
                raise ValueError(
                    f"finetuned_encoders[{task!r}] is a {type(src).__name__}, the pretrained encoder a "
                    f"{type(self.pretrained_encoder).__name__}: encoders must share one architecture"
                )
            if _is_lazy(src) and not values:
                continue  # checkpoints and loaders are read (and checked) by fit, not re-read here
            V.check_encoder_states(pre_state, self._expert(src, task, pre_state), task, values=values)

    def _check_fit_data(self, X, tasks, device, dtype):
        sources, _ = split_inputs_and_labels(X, None)
        V.check_same_tasks(finetuned_encoders=dict.fromkeys(tasks), X=sources)
        # inputs stay where they are (loaders and arrays: host memory); fitting moves one batch at a
        # time to the fit device, so the device holds no copy of every task's data
        cap = self.max_samples_per_task
        x = {t: materialize_inputs(sources[t], task=t, dtype=dtype, max_samples=cap) for t in tasks}
        many = {t: len(v) for t, v in x.items() if len(v) > _MANY_SAMPLES}
        if many and cap is None:
            warnings.warn(
                f"fit read every fit input of task(s) {many} (samples) into memory and runs every expert on "
                f"them; MOMA needs a few per class: max_samples_per_task caps what fit reads",
                UserWarning,
                stacklevel=4,  # through the with_autograd wrapper to the caller of fit
            )
        V.check_sample_shapes(x, tasks, one_task_per_pass=self.task_batching in ("sequential", 1))
        return x

    # ------------------------------------------------------------------ fit
    @with_autograd
    def fit(self, X, y=None):
        """Learn the global mask and one rotation per task from unlabeled inputs.

        Parameters
        ----------
        X : dict of str to (DataLoader, Dataset, Tensor or ndarray), or TaskSamples
            Unlabeled inputs per task (loaders/datasets may yield ``(x, y)``; labels are ignored).
        y : ignored
            Labels are never used by fitting; accepted for scikit-learn compatibility.

        Returns
        -------
        self : MOMAMerger
        """
        self._reset_fitted()
        device = self._check_params()
        checkpointing = self._checked_checkpointing()
        # cheap checks first: models' structure, heads, data; reading the experts comes last
        tasks, pre_state, fts, heads = self._check_models(experts=False)
        dtype = V.encoder_dtype(self.pretrained_encoder, pre_state) or torch.float32
        V.check_heads(heads, None, dtype, rotations=self.learn_rotations)
        x_all = self._check_fit_data(X, tasks, device, dtype)

        rng = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        skeleton = structure_copy(self.pretrained_encoder, device=device)
        theta0 = {k: v.to(device) for k, v in pre_state.items()}
        autocast = V.PRECISIONS[self.precision]
        feature_dim = V.feature_dims(skeleton, theta0, x_all, tasks, autocast)
        V.check_heads(heads, feature_dim, rotations=False)  # their input size, now that it is known
        self._check_experts(fts, pre_state, eager=False)  # the checkpoints and loaders
        head_specs = {t: HeadSpec.of(heads[t], device) for t in tasks}

        x_train, x_val = self._holdout(x_all, generator)
        targets_train, targets_val = {}, {}
        # checkpoints and loaders with the Task Arithmetic base: tau_MT is summed from the same read
        # that gives the teacher logits (one read per expert, not two)
        lazy_ta = self.base == "task_arithmetic" and any(_is_lazy(s) for s in fts.values())
        tau = {k: torch.zeros_like(v) for k, v in theta0.items() if v.is_floating_point()} if lazy_ta else None
        for t in tasks:  # one expert at a time: it can leave memory afterwards
            state = {k: v.to(device) for k, v in self._expert(fts[t], t, pre_state).items()}
            targets_train[t] = teacher_targets(skeleton, state, head_specs[t], x_train[t], autocast_dtype=autocast)
            if t in x_val:
                targets_val[t] = teacher_targets(skeleton, state, head_specs[t], x_val[t], autocast_dtype=autocast)
            if tau is not None:
                _add_task_vector(tau, state, theta0)
            del state
        if tau is None:
            tau = self._multitask_vector(pre_state, fts, device)

        cfg = FitConfig(
            sparsity=self.sparsity,
            scaling=self.scaling,
            use_mask=self.learn_mask,
            use_rotations=self.learn_rotations,
            objective=self.objective,
            n_steps=self.n_steps,
            lr=self.lr,
            rotation_lr=self.rotation_lr,
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            rotation_map=self.rotation_map,
            rotation_init=self.rotation_init,
            autocast_dtype=autocast,
            task_batching=self.task_batching,
            micro_batch_size=self.micro_batch_size,
            gradient_checkpointing=checkpointing,
            recompute_merged_weights=bool(self.recompute_merged_weights),
            cuda_graphs=self.cuda_graphs,
            verbose=self.verbose,
        )
        progress = None
        if self.verbose:
            from tqdm.auto import tqdm

            def progress(it):
                return tqdm(it, desc="MOMA fit", unit="step")

        result = fit_moma(
            skeleton,
            theta0,
            tau,
            head_specs,
            x_train,
            targets_train,
            x_val,
            targets_val,
            cfg,
            generator=generator,
            progress=progress,
        )
        self.tasks_ = tasks
        self.mask_ = result.mask
        self.rotations_ = result.rotations
        self.history_ = result.history
        self.n_iter_ = result.n_iter
        self.best_step_ = result.best_step
        self.feature_dim_ = feature_dim
        self.interrupted_ = result.interrupted
        self.merge_params_ = {k: getattr(self, k) for k in _MERGE_PARAMS}
        self.extra_params_ = 0  # mask and rotations are absorbed (as the baselines report theirs)
        if result.interrupted:
            # The interrupt still stops the program (a search, a script): the merger keeps the state.
            raise KeyboardInterrupt(
                f"fit interrupted at step {result.n_iter}; the merger keeps the best state so far "
                f"(step {result.best_step}): transform() and score() use it (interrupted_=True)"
            )
        return self

    def _runtime_device(self):
        """The device that transform and score use (with the precision checked); not the fit settings."""
        V.check_choice(self.precision, "precision", list(V.PRECISIONS))
        return V.resolve_device(self.device)

    def __setstate__(self, state):
        # Pickles of earlier versions: parameters added since take their defaults, and a fitted
        # merger gets the attributes fit records now (its merge settings: the parameters it has).
        super().__setstate__(state)
        self._complete_state()

    def _complete_state(self):
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name != "self" and param.default is not param.empty and name not in self.__dict__:
                setattr(self, name, param.default)
        if "mask_" in self.__dict__:
            self.__dict__.setdefault("merge_params_", {k: getattr(self, k) for k in _MERGE_PARAMS})
            self.__dict__.setdefault("extra_params_", 0)

    def _merge_param(self, name):
        """A base-merge setting: as fitted (``merge_params_``) once fitted, else the parameter."""
        fitted = self.__dict__.get("merge_params_")
        return fitted[name] if fitted is not None and name in fitted else getattr(self, name)

    def _expert(self, source, task, pre_state):
        """One fine-tuned encoder's state dict, conformed to the pretrained one (:func:`_load_state`)."""
        aliases = frozenset(self.pretrained_encoder.state_dict(keep_vars=True)) - frozenset(pre_state)
        return _load_state(source, task, pre_state, aliases)

    def _checked_checkpointing(self):
        """``gradient_checkpointing`` checked against the encoder (raises before any work)."""
        spec = self.gradient_checkpointing
        if isinstance(spec, np.bool_):
            spec = bool(spec)
        if isinstance(self.pretrained_encoder, torch.nn.Module):  # else _check_models says what it is
            # TypeError / ValueError naming the problem
            recompute = bool(self.recompute_merged_weights) if self.learn_mask else False  # ignored without a mask
            recomputed_blocks(self.pretrained_encoder, spec, recompute)
        return spec

    def _reset_fitted(self):
        for attr in _FITTED:
            self.__dict__.pop(attr, None)

    def _holdout(self, x_all, generator):
        """Split each task's unlabeled inputs into fit and held-out parts (seeded)."""
        x_train, x_val = {}, {}
        for t, x in x_all.items():
            n_val = int(round(self.validation_fraction * len(x)))
            if n_val == 0 or n_val >= len(x):
                x_train[t] = x
                continue
            perm = torch.randperm(len(x), generator=generator).to(x.device)
            x_val[t], x_train[t] = x[perm[:n_val]], x[perm[n_val:]]
        if len(x_val) != len(x_all):  # early stopping needs every task's loss
            if self.validation_fraction > 0:
                small = {t: len(x) for t, x in x_all.items() if t not in x_val}
                warnings.warn(
                    f"validation_fraction={self.validation_fraction} holds out no sample of task(s) {small} "
                    "(samples per task); fitting without a held-out set, on every sample, for all tasks",
                    UserWarning,
                    stacklevel=4,  # through the with_autograd wrapper to the caller of fit
                )
            return x_all, {}
        return x_train, x_val

    def _multitask_vector(self, pre_state, fts, device):
        base, top_k = self._merge_param("base"), self._merge_param("top_k")
        lazy = any(_is_lazy(s) for s in fts.values())
        if lazy and base == "task_arithmetic":  # stream checkpoints: one expert in memory at a time
            tau = {k: torch.zeros_like(v) for k, v in pre_state.items() if v.is_floating_point()}
            for t, s in fts.items():
                _add_task_vector(tau, self._expert(s, t, pre_state), pre_state)
        elif lazy:  # TIES reads each checkpoint twice, one expert in memory at a time
            loaders = {t: functools.partial(self._expert, s, t, pre_state) for t, s in fts.items()}
            tau = _ties_vector(pre_state, loaders, top_k=top_k, merge="sum")
        else:  # modules: their state dicts, no copies
            states = {t: self._expert(s, t, pre_state) for t, s in fts.items()}
            tau = multitask_vector(pre_state, states, base=base, top_k=top_k)
        return {k: v.to(device) for k, v in tau.items()}

    # ------------------------------------------------------------------ transform / score
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The absorbed encoder weights ``θ_0 + λ (m ⊙ τ_MT)`` as a new state dict (on the fit device).

        It has the keys of the encoder's own ``state_dict()``: a tied weight appears under each of
        its names, as one tensor, so ``encoder.load_state_dict`` takes it.
        """
        check_is_fitted(self, "mask_")
        device = V.resolve_device(self.device)
        tasks, pre_state, fts, _ = self._check_models(values=False)
        if set(tasks) != set(self.tasks_):
            raise ValueError(f"the models now name tasks {tasks}, but this merger was fitted on {self.tasks_}")
        theta0 = {k: v.to(device) for k, v in pre_state.items()}
        # summed in the fitted order (dicts given in another order: the same bits)
        tau = self._multitask_vector(pre_state, {t: fts[t] for t in self.tasks_}, device)
        mask = {k: v.to(device) for k, v in self.mask_.items()}
        merged = merged_state(theta0, tau, mask, self._merge_param("scaling"))
        full = self.pretrained_encoder.state_dict(keep_vars=True)
        name_of = {id(v): k for k, v in full.items() if k in merged}  # tied names: the one merged
        return {k: merged[k] if k in merged else merged[name_of[id(v)]] for k, v in full.items()}

    def transform(self, X=None):
        """Return the absorbed merged model (zero additional parameters).

        Parameters
        ----------
        X : ignored
            Present for API symmetry; the merged model does not depend on data.

        Returns
        -------
        MergedModel
            ``.encoder`` is a new instance of the user's encoder class holding
            ``θ_0 + λ (m ⊙ τ_MT)``; ``.heads`` holds copies of the heads with ``W_t Q_t``.
            It is placed on the pretrained encoder's device, in eval mode.

        Notes
        -----
        The merger stores the mask and the rotations, not ``τ_MT``: the fine-tuned encoders are
        read again here, so pass the models it was fitted with (a changed expert changes the result).
        ``base``, ``scaling`` and ``top_k`` are those ``fit`` used (``merge_params_``), not the
        current parameters: ``set_params`` after ``fit`` takes effect at the next ``fit``.
        """
        state = self.merged_state_dict()
        target = next((v.device for v in as_state_dict(self.pretrained_encoder).values()), torch.device("cpu"))
        encoder = clone_with_state(self.pretrained_encoder, {k: v.to(target) for k, v in state.items()})
        new_heads = absorb_heads(self._fitted_heads(), self.rotations_)
        return MergedModel(encoder, new_heads).eval()

    def _fitted_heads(self) -> dict:
        """The heads of the fitted tasks, checked against the learned rotations."""
        heads = V.check_heads_dict(self.heads)
        V.check_same_tasks(tasks_=dict.fromkeys(self.tasks_), heads=heads)
        pre_state = as_state_dict(self.pretrained_encoder)
        pre_dtype = V.encoder_dtype(self.pretrained_encoder, pre_state)
        V.check_heads(heads, self.feature_dim_, pre_dtype, rotations=False)
        return {t: heads[t] for t in self.tasks_}

    def score_per_task(self, X, y=None) -> dict[str, float]:
        """Top-1 accuracy of the absorbed model on each task.

        Parameters
        ----------
        X : dict or TaskSamples
            Labelled inputs per task: loaders/datasets yielding ``(x, y)``, ``{task: (inputs, labels)}``,
            or ``{task: inputs}`` with ``y={task: labels}``; or a labelled ``TaskSamples``.
        y : dict of str to array-like, or array-like, optional
            Labels, when ``X`` does not carry them (an array aligned with a ``TaskSamples``).

        Returns
        -------
        dict of str to float
        """
        check_is_fitted(self, "mask_")
        device = self._runtime_device()
        sources, labels = check_scoring_inputs(X, y, self.tasks_)  # before the merge
        model = self.transform().to(device)
        autocast = V.PRECISIONS[self.precision]
        return _accuracy_of_sources(model, sources, labels, device=device, autocast_dtype=autocast)

    def score(self, X, y=None) -> float:
        """Mean over tasks of the absorbed model's top-1 accuracy (unweighted).

        Parameters
        ----------
        X, y
            As in :meth:`score_per_task`.

        Returns
        -------
        float
        """
        return float(np.mean(list(self.score_per_task(X, y).values())))

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Save the learned state (mask, rotations, parameters, task names) — not the encoders.

        The write is atomic: a temporary file renamed into place.

        Parameters
        ----------
        path : str or os.PathLike
            The file; missing parent folders are created.
        """
        import joblib

        check_is_fitted(self, "mask_")
        path = Path(path).expanduser()
        params = {k: v for k, v in self.get_params(deep=False).items() if k not in MODULE_PARAMS}
        seed = params.get("random_state")
        # a seed is kept (numpy integers too); a RandomState instance's state is not
        params["random_state"] = int(seed) if isinstance(seed, numbers.Integral) else None
        if not _picklable(params.get("gradient_checkpointing")):
            params["gradient_checkpointing"] = False  # a local class; it changes memory, not results
        state = {
            "format": "momaestimator.MOMAMerger/1",
            "params": params,
            "fitted": {k: getattr(self, k) for k in _FITTED if k != "mask_"},
            "mask": {k: (tuple(v.shape), np.packbits(v.numpy().ravel())) for k, v in self.mask_.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: joblib.dump(state, tmp))

    @classmethod
    def load(cls, path, pretrained_encoder, finetuned_encoders, heads, *, device=None):
        """Rebuild a fitted merger from :meth:`save`'s file and the same models.

        Parameters
        ----------
        path : str or os.PathLike
        pretrained_encoder, finetuned_encoders, heads
            The models the merger was fitted with (their dicts in any task order).
        device : str or torch.device, optional
            Where :meth:`transform` merges and :meth:`score` runs. ``None``: the saved ``device``,
            or the CPU when that is a CUDA device and none is available (a merger fitted on a GPU
            machine, loaded on a laptop).

        Returns
        -------
        MOMAMerger
        """
        import joblib

        path = Path(path).expanduser()
        try:
            with open(path, "rb") as f:
                state = joblib.load(f)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot read {os.fspath(path)!r}: truncated or not a MOMAMerger file ({exc})") from exc
        if not isinstance(state, Mapping) or state.get("format") != "momaestimator.MOMAMerger/1":
            raise ValueError(f"{os.fspath(path)!r} is not a file written by MOMAMerger.save")
        params = dict(state["params"])
        if device is not None:
            params["device"] = device
        elif str(params.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
            params["device"] = "cpu"
        merger = cls(pretrained_encoder, finetuned_encoders, heads, **params)
        merger._runtime_device()  # the device is usable here
        tasks, pre_state, _, _ = merger._check_models()
        fitted = state["fitted"]
        if set(tasks) != set(fitted["tasks_"]):  # any order: the fitted one is kept
            raise ValueError(f"{os.fspath(path)!r} was fitted on tasks {fitted['tasks_']}, the models name {tasks}")
        mask = {}
        for k, (shape, bits) in state["mask"].items():
            if k not in pre_state or tuple(pre_state[k].shape) != tuple(shape):
                raise ValueError(f"{os.fspath(path)!r}: mask entry {k!r} does not match the pretrained encoder")
            n = int(np.prod(shape))
            mask[k] = torch.from_numpy(np.unpackbits(bits)[:n].astype(bool)).view(shape)
        uncovered = [k for k, v in pre_state.items() if v.is_floating_point() and k not in mask]
        if uncovered:
            raise ValueError(
                f"{os.fspath(path)!r}: its mask does not cover {len(uncovered)} entries of the pretrained encoder "
                f"(e.g. {uncovered[:3]}); it was fitted on another architecture"
            )
        for k, v in fitted.items():
            setattr(merger, k, v)
        merger.mask_ = mask
        merger._complete_state()  # files saved before merge_params_ / extra_params_ were recorded
        merger._fitted_heads()  # heads that fit the saved rotations (feature size, dtype)
        return merger
