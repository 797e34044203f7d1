"""Baselines that learn from unlabeled data: AdaMerging, Representation Surgery, head fine-tuning
(FT-Classifier) and closed-form Procrustes rotations.

Each follows its reference recipe where one is published (objective, parameterisation, learning
rate) with the step count as a parameter; the docstrings say where we depart from it.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.func import functional_call

from .. import _validation as V
from ..merging.fit import HeadSpec, merged_state, work_dtype
from ..merging.functional import (
    absorb_heads,
    clone_with_state,
    encode,
    private_buffers,
    structure_copy,
    with_autograd,
)
from ..merging.objectives import entropy, kl_to_teacher
from ..merging.rotation import orthogonal_procrustes
from ..merging.task_arithmetic import multitask_vector
from ..merging.task_vectors import as_state_dict
from ..models import MergedModel
from .base import MergerBase
from .static import _copy_heads

__all__ = ["AdaMerging", "HeadFineTuning", "ProcrustesAlignment", "RepresentationSurgery", "SurgeryModel"]


def _generator(random_state) -> torch.Generator:
    rng = check_random_state(random_state)
    return torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))


def _sample(x_by_task, batch_size, generator):
    """Per task, ``min(batch_size, n)`` distinct samples (without replacement, as MOMAMerger draws)."""
    return {t: torch.randperm(len(x), generator=generator)[:batch_size] for t, x in x_by_task.items()}


class _DataMerger(MergerBase):
    """Common set-up: validated models, unlabeled inputs on the device, base merge, experts' outputs."""

    def _check_params(self):
        V.check_number(self.n_steps, "n_steps", low=0, integer=True)
        V.check_number(self.lr, "lr", low=0.0, low_open=True)
        V.check_number(self.batch_size, "batch_size", low=1, integer=True)
        return self._check_base_params()

    def _check_base_params(self):
        """The base merge's settings (where the method has one) and the device."""
        if hasattr(self, "base"):
            V.check_choice(self.base, "base", V.BASES)
        if hasattr(self, "scaling"):
            V.check_number(self.scaling, "scaling", low=0.0, low_open=True)
        if hasattr(self, "random_state"):
            V.check_random_state(self.random_state)
        return V.resolve_device(self.device)

    def _setup(self, X):
        device = self._check_params()
        tasks, pre, fts, heads = self._validated_models()
        dtype = V.encoder_dtype(self.pretrained_encoder, pre)
        x = self._unlabeled(X, tasks, device, dtype)
        skeleton = structure_copy(self.pretrained_encoder, device=device)
        theta0 = {k: v.to(device) for k, v in pre.items()}
        V.check_heads(heads, V.feature_dim(skeleton, theta0, x[tasks[0]]), rotations=False)
        return device, tasks, fts, heads, x, skeleton, theta0

    def _base_state(self, theta0, device):
        tau = multitask_vector(
            self.pretrained_encoder,
            self.finetuned_encoders,
            base=self._merge_param("base"),
            top_k=self._merge_param("top_k", 0.2),
        )
        return merged_state(theta0, {k: v.to(device) for k, v in tau.items()}, None, self._merge_param("scaling"))

    def _base_encoder(self):
        device = V.resolve_device(self.device)
        theta0 = {k: v.to(device) for k, v in as_state_dict(self.pretrained_encoder).items()}
        target = next(iter(as_state_dict(self.pretrained_encoder).values())).device
        return clone_with_state(
            self.pretrained_encoder, {k: v.to(target) for k, v in self._base_state(theta0, device).items()}
        )


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's first parameter or buffer lives (the CPU for one without tensors)."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


class AdaMerging(_DataMerger):
    """AdaMerging: learn merging coefficients by minimising prediction entropy on unlabeled data.

    ``θ = θ_0 + Σ_t λ_t τ_t`` with one ``λ_t`` per task (``granularity="task"``) or one per task and
    state-dict tensor (``"layer"``, the reference's layer-wise variant), initialised at
    ``init_scaling``, optimised with Adam on the summed per-task entropy and clipped to [0, 1] after
    every step, as in Yang et al. (2024). The reference runs 500 steps of batch 16 per task on the
    test inputs; ``n_steps`` sets the count here. Holds the ``T`` task vectors in memory, as the
    reference does.

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).
    granularity : {"task", "layer"}, default="layer"
    init_scaling : float, default=0.3
    n_steps : int, default=100
    lr : float, default=1e-3
    batch_size : int, default=16
    device : str, default="cpu"
    random_state : int, RandomState instance or None, default=None

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import AdaMerging
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> X = {t: x for t, (x, y) in data.items()}
    >>> ada = AdaMerging(pre, experts, heads, granularity="task", n_steps=3, random_state=0).fit(X)
    >>> tuple(ada.coefficients_.shape)
    (2, 1)
    """

    def __init__(
        self,
        pretrained_encoder=None,
        finetuned_encoders=None,
        heads=None,
        *,
        granularity="layer",
        init_scaling=0.3,
        n_steps=100,
        lr=1e-3,
        batch_size=16,
        device="cpu",
        random_state=None,
    ):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads
        self.granularity = granularity
        self.init_scaling = init_scaling
        self.n_steps = n_steps
        self.lr = lr
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state

    @with_autograd
    def fit(self, X, y=None):
        """Learn the coefficients on unlabeled inputs (labels ignored).

        Parameters
        ----------
        X : dict or TaskSamples
            Unlabeled inputs per task.
        y : ignored

        Returns
        -------
        self
        """
        self._reset_fitted()  # a failed refit leaves the estimator unfitted, not half old
        V.check_choice(self.granularity, "granularity", ("task", "layer"))
        V.check_number(self.init_scaling, "init_scaling (the coefficients are kept in [0, 1])", low=0.0, high=1.0)
        device, tasks, fts, heads, x, skeleton, theta0 = self._setup(X)
        keys = [k for k, v in theta0.items() if v.is_floating_point()]
        # per tensor, the T task vectors stacked: one tensordot per tensor and step
        taus = {k: torch.stack([as_state_dict(fts[t])[k].to(device) - theta0[k] for t in tasks]) for k in keys}
        n_groups = 1 if self.granularity == "task" else len(keys)
        coef = torch.full((len(tasks), n_groups), float(self.init_scaling), device=device, requires_grad=True)
        specs = {t: HeadSpec.of(heads[t], device) for t in tasks}
        opt = torch.optim.Adam([coef], lr=self.lr)
        gen = _generator(self.random_state)
        history, start = [], time.perf_counter()
        weights = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
        for step in range(1, self.n_steps + 1):
            theta = self._merge(theta0, taus, coef, keys, weights)
            idx = _sample(x, self.batch_size, gen)
            z = encode(skeleton, theta, torch.cat([x[t][idx[t]] for t in tasks]))
            loss, offset = 0.0, 0
            for t in tasks:
                n = len(idx[t])
                logits = functional_call(
                    specs[t].skeleton, private_buffers(specs[t].skeleton, specs[t].state), (z[offset : offset + n],)
                )
                loss = loss + entropy(logits)
                offset += n
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                coef.clamp_(0.0, 1.0)
            history.append({"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - start})
        self.tasks_, self.keys_ = tasks, keys
        self.coefficients_ = coef.detach().cpu()
        self.history_, self.n_iter_, self.extra_params_ = history, self.n_steps, 0
        self._freeze_merge_params()
        return self

    def _merge(self, theta0, taus, coef, keys, weights=None):
        # entries outside `weights` (float buffers: BatchNorm's running statistics) are merged with
        # the same coefficients but without a gradient, which batch_norm would refuse
        out = dict(theta0)
        for j, k in enumerate(keys):
            col = 0 if coef.shape[1] == 1 else j
            c = coef[:, col] if weights is None or k in weights else coef[:, col].detach()
            out[k] = theta0[k] + torch.tensordot(c.to(taus[k].dtype), taus[k], dims=1)
        return out

    def transform(self, X=None):
        """The merged model with the learned coefficients.

        Parameters
        ----------
        X : ignored

        Returns
        -------
        MergedModel
        """
        check_is_fitted(self, "coefficients_")
        pre = as_state_dict(self.pretrained_encoder)
        fts = V.check_task_dict(self.finetuned_encoders, "finetuned_encoders")
        taus = {
            k: torch.stack([as_state_dict(fts[t])[k].to(pre[k].device) - pre[k] for t in self.tasks_])
            for k in self.keys_
        }
        with torch.no_grad():
            theta = self._merge(pre, taus, self.coefficients_.to(next(iter(pre.values())).device), self.keys_)
        encoder = clone_with_state(self.pretrained_encoder, theta)
        return MergedModel(encoder, _copy_heads(V.check_heads_dict(self.heads), self.tasks_)).eval()


class SurgeryModel(nn.Module):
    """Merged encoder + per-task representation-surgery adapters + heads.

    ``forward(x, task) = head_t(z − up_t(ReLU(down_t(z))))`` with ``z`` the merged features.

    Returned by :meth:`RepresentationSurgery.transform`; the adapters are extra inference
    parameters (``extra_params_``).

    Parameters
    ----------
    encoder : torch.nn.Module
        The merged encoder.
    adapters : dict of str to torch.nn.Module
        One adapter per task, ``z ↦ up_t(ReLU(down_t(z)))``.
    heads : dict of str to torch.nn.Module
        One head per task.

    Examples
    --------
    >>> import torch
    >>> from momaestimator.baselines import SurgeryModel
    >>> zero = torch.nn.Linear(2, 2, bias=False)
    >>> _ = torch.nn.init.zeros_(zero.weight)
    >>> model = SurgeryModel(torch.nn.Identity(), {"a": zero}, {"a": torch.nn.Identity()})
    >>> model(torch.ones(1, 2), "a")
    tensor([[1., 1.]], grad_fn=<SubBackward0>)
    """

    def __init__(self, encoder, adapters, heads):
        super().__init__()
        self.encoder = encoder
        self.adapters = nn.ModuleDict(dict(adapters))
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x, task):
        """Logits of ``task``'s head on ``x``.

        Parameters
        ----------
        x : torch.Tensor
            A batch of encoder inputs.
        task : str
            Which task's encoder/adapter and head to use.

        Returns
        -------
        torch.Tensor
        """
        task = task if isinstance(task, str) else str(task)
        z = self.encoder(x)
        adapter = self.adapters[task]
        dtype = next(adapter.parameters()).dtype  # adapters train in float32 (float64 models: float64)
        zc = z.to(dtype)
        return self.heads[task]((zc - adapter(zc)).to(z.dtype))


def _adapter(dim, rank, generator):
    """``up(ReLU(down(z)))`` with ``up = 0`` (the base merge), drawn from ``generator`` only.

    ``up``'s initialisation is drawn and then zeroed, ``down`` gets ``nn.Linear``'s own, so the
    draws are those of constructing the two layers under a seeded global generator — without
    touching the global generator, which concurrent fits in threads share.
    """
    up = nn.utils.skip_init(nn.Linear, rank, dim, bias=False)
    nn.init.kaiming_uniform_(up.weight, a=math.sqrt(5), generator=generator)  # nn.Linear.reset_parameters
    nn.init.zeros_(up.weight)  # start from the base merge
    down = nn.utils.skip_init(nn.Linear, dim, rank, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5), generator=generator)
    return nn.Sequential(down, nn.ReLU(), up)


class RepresentationSurgery(_DataMerger):
    """Representation Surgery (Yang et al., 2024): a rank-``r`` adapter per task on the merged features.

    Trained to bring the merged features to the experts' features (L1 distance) on unlabeled
    inputs. It **adds** ``2 · d · rank`` parameters per task at inference (``extra_params_``).

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).
    base : {"task_arithmetic", "ties"}, default="task_arithmetic"
    scaling : float, default=0.3
    rank : int, default=16
    n_steps : int, default=100
    lr : float, default=1e-3
    batch_size : int, default=16
    device : str, default="cpu"
    random_state : int, RandomState instance or None, default=None

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import RepresentationSurgery
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> X = {t: x for t, (x, y) in data.items()}
    >>> RepresentationSurgery(pre, experts, heads, rank=2, n_steps=2, random_state=0).fit(X).extra_params_
    64
    """

    def __init__(
        self,
        pretrained_encoder=None,
        finetuned_encoders=None,
        heads=None,
        *,
        base="task_arithmetic",
        scaling=0.3,
        rank=16,
        n_steps=100,
        lr=1e-3,
        batch_size=16,
        device="cpu",
        random_state=None,
    ):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads
        self.base = base
        self.scaling = scaling
        self.rank = rank
        self.n_steps = n_steps
        self.lr = lr
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state

    @with_autograd
    def fit(self, X, y=None):
        """Train the adapters on unlabeled inputs (labels ignored).

        Parameters
        ----------
        X : dict or TaskSamples
        y : ignored

        Returns
        -------
        self
        """
        self._reset_fitted()  # a failed refit leaves the estimator unfitted, not half old
        V.check_number(self.rank, "rank", low=1, integer=True)
        device, tasks, fts, heads, x, skeleton, theta0 = self._setup(X)
        theta = self._base_state(theta0, device)
        with torch.no_grad():  # features in the working dtype (half-precision models: float32)
            feats = {t: encode(skeleton, theta, x[t]) for t in tasks}
            work = torch.float64 if feats[tasks[0]].dtype == torch.float64 else torch.float32
            feats = {t: f.to(work) for t, f in feats.items()}
            targets = {t: self._teacher(skeleton, fts[t], heads[t], x[t], device)[1].to(work) for t in tasks}
        dim = feats[tasks[0]].shape[1]
        gen = _generator(self.random_state)
        init = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
        adapters = nn.ModuleDict({t: _adapter(dim, self.rank, init) for t in tasks}).to(device, work)
        opt = torch.optim.Adam(adapters.parameters(), lr=self.lr)
        history = []
        for step in range(1, self.n_steps + 1):
            idx = _sample(x, self.batch_size, gen)
            loss = sum(
                nn.functional.l1_loss(feats[t][idx[t]] - adapters[t](feats[t][idx[t]]), targets[t][idx[t]])
                for t in tasks
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": float(loss.detach())})
        self.tasks_, self.adapters_ = tasks, adapters.cpu().eval().requires_grad_(False)
        self.history_, self.n_iter_ = history, self.n_steps
        self.extra_params_ = sum(p.numel() for p in adapters.parameters())
        self._freeze_merge_params()
        return self

    def transform(self, X=None):
        """Merged encoder + adapters + heads.

        Parameters
        ----------
        X : ignored

        Returns
        -------
        SurgeryModel
        """
        check_is_fitted(self, "adapters_")
        heads = _copy_heads(V.check_heads_dict(self.heads), self.tasks_)
        encoder = self._base_encoder()
        device = _device_of(encoder)  # the adapters work on the encoder's features, where it lives
        # copies: the model is the user's to change
        adapters = {t: copy.deepcopy(self.adapters_[t]).to(device) for t in self.tasks_}
        return SurgeryModel(encoder, adapters, heads).eval()


class HeadFineTuning(_DataMerger):
    """FT-Classifier: fine-tune each task's head on the merged features to match its expert (KL).

    The authors' v1/v2 recipe: KL from the expert's predictions on a few unlabeled samples per task,
    Adam at 5e-4. Zero extra parameters (the heads are replaced). ``n_steps`` mini-batches of
    ``batch_size`` per task.

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).
    base : {"task_arithmetic", "ties"}, default="task_arithmetic"
    scaling : float, default=0.3
    n_steps : int, default=100
    lr : float, default=5e-4
    batch_size : int, default=16
    device : str, default="cpu"
    random_state : int, RandomState instance or None, default=None

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import HeadFineTuning
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> X = {t: x for t, (x, y) in data.items()}
    >>> HeadFineTuning(pre, experts, heads, n_steps=3, random_state=0).fit(X).extra_params_
    0
    """

    def __init__(
        self,
        pretrained_encoder=None,
        finetuned_encoders=None,
        heads=None,
        *,
        base="task_arithmetic",
        scaling=0.3,
        n_steps=100,
        lr=5e-4,
        batch_size=16,
        device="cpu",
        random_state=None,
    ):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads
        self.base = base
        self.scaling = scaling
        self.n_steps = n_steps
        self.lr = lr
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state

    @with_autograd
    def fit(self, X, y=None):
        """Fine-tune the heads on unlabeled inputs (labels ignored).

        Parameters
        ----------
        X : dict or TaskSamples
        y : ignored

        Returns
        -------
        self
        """
        self._reset_fitted()  # a failed refit leaves the estimator unfitted, not half old
        device, tasks, fts, heads, x, skeleton, theta0 = self._setup(X)
        theta = self._base_state(theta0, device)
        with torch.no_grad():
            feats = {t: encode(skeleton, theta, x[t]) for t in tasks}
            teacher = {t: self._teacher(skeleton, fts[t], heads[t], x[t], device)[0] for t in tasks}
        # train in float32 (float64 models: float64): Adam in half precision underflows
        work = torch.float64 if feats[tasks[0]].dtype == torch.float64 else torch.float32
        feats = {t: f.to(work) for t, f in feats.items()}
        teacher = {t: v.to(work) for t, v in teacher.items()}
        dtypes = {t: {k: v.dtype for k, v in heads[t].state_dict().items()} for t in tasks}
        tuned = {
            t: {
                k: v.detach()
                .to(device, work if v.is_floating_point() else v.dtype)
                .clone()
                .requires_grad_(v.is_floating_point())
                for k, v in heads[t].state_dict().items()
            }
            for t in tasks
        }
        skels = {t: structure_copy(heads[t], device=device) for t in tasks}
        params = [v for st in tuned.values() for v in st.values() if v.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr)
        gen = _generator(self.random_state)
        history = []
        for step in range(1, self.n_steps + 1):
            idx = _sample(x, self.batch_size, gen)
            loss = sum(
                kl_to_teacher(functional_call(skels[t], tuned[t], (feats[t][idx[t]],)), teacher[t][idx[t]])
                for t in tasks
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": float(loss.detach())})
        self.tasks_ = tasks
        self.head_states_ = {
            t: {k: v.detach().to(dtypes[t][k]).cpu() for k, v in st.items()} for t, st in tuned.items()
        }
        self.history_, self.n_iter_, self.extra_params_ = history, self.n_steps, 0
        self._freeze_merge_params()
        return self

    def transform(self, X=None):
        """Base-merged encoder + fine-tuned heads.

        Parameters
        ----------
        X : ignored

        Returns
        -------
        MergedModel
        """
        check_is_fitted(self, "head_states_")
        heads = V.check_heads_dict(self.heads)
        new = {}
        for t in self.tasks_:  # each tuned head where the user's head lives
            device = _device_of(heads[t])
            new[t] = clone_with_state(heads[t], {k: v.to(device) for k, v in self.head_states_[t].items()})
        return MergedModel(self._base_encoder(), new).eval()


class ProcrustesAlignment(_DataMerger):
    """Closed-form rotation: per task, ``Q_t = argmin_Q ‖Q z_merged − z_expert‖`` over rotations (Procrustes).

    Features are L2-normalised first (the heads see normalised features); ``Q_t`` comes from the SVD
    of ``Σ z_expert z_mergedᵀ`` with Kabsch's correction (determinant +1, as MOMA's rotations) and
    is the identity outside the span of the fit samples (few-shot: fewer samples than dimensions,
    where the plain ``U Vᵀ`` would be arbitrary), see
    :func:`~momaestimator.merging.rotation.orthogonal_procrustes`. Absorbed into the head exactly as
    MOMA's rotations. No optimisation, no mask, zero extra parameters.

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).
    base : {"task_arithmetic", "ties"}, default="task_arithmetic"
    scaling : float, default=0.3
    device : str, default="cpu"

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import ProcrustesAlignment
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> X = {t: x for t, (x, y) in data.items()}
    >>> q = ProcrustesAlignment(pre, experts, heads).fit(X).rotations_["task0"]
    >>> bool(torch.allclose(q @ q.T, torch.eye(8), atol=1e-5))
    True
    """

    def __init__(
        self,
        pretrained_encoder=None,
        finetuned_encoders=None,
        heads=None,
        *,
        base="task_arithmetic",
        scaling=0.3,
        device="cpu",
    ):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads
        self.base = base
        self.scaling = scaling
        self.device = device

    @with_autograd
    def fit(self, X, y=None):
        """Compute the rotations from unlabeled inputs (labels ignored).

        Parameters
        ----------
        X : dict or TaskSamples
        y : ignored

        Returns
        -------
        self
        """
        self._reset_fitted()  # a failed refit leaves the estimator unfitted, not half old
        device, tasks, fts, heads, x, skeleton, theta0 = self._setup(X)
        theta = self._base_state(theta0, device)
        rotations = {}
        with torch.no_grad():
            for t in tasks:
                z = encode(skeleton, theta, x[t])
                expert = self._teacher(skeleton, fts[t], heads[t], x[t], device)[1]
                # a rotation (det +1), the identity outside the span of the few fit samples
                rotations[t] = orthogonal_procrustes(z, expert, normalize=True).to(work_dtype(z))
        self.tasks_, self.rotations_, self.extra_params_ = tasks, rotations, 0
        self._freeze_merge_params()
        return self

    _absorbs_rotations = True

    def _check_params(self):  # closed form: no optimiser settings to check
        return self._check_base_params()

    def transform(self, X=None):
        """Base-merged encoder + heads with the rotations absorbed.

        Parameters
        ----------
        X : ignored

        Returns
        -------
        MergedModel
        """
        check_is_fitted(self, "rotations_")
        heads = V.check_heads_dict(self.heads)
        return MergedModel(
            self._base_encoder(), absorb_heads({t: heads[t] for t in self.tasks_}, self.rotations_)
        ).eval()
