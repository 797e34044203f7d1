"""Task Arithmetic, TIES-Merging and weight averaging on state dicts (pure torch).

Each function returns a new state dict and never modifies its inputs. Task vectors are
formed one tensor at a time, so memory is a few copies of one model whatever the number
of tasks (TIES also needs one task's flattened vector at a time to find its global top-k
threshold). TIES reads the experts task by task, so experts given as loaders (checkpoints read on
demand) are in memory one at a time.
"""

from __future__ import annotations

import torch

from .task_vectors import as_state_dict, as_task_dict, check_same_keys, is_mergeable

__all__ = [
    "multitask_vector",
    "task_arithmetic",
    "ties_merging",
    "ties_thresholds",
    "weight_averaging",
]


def _prepare(pretrained, finetuned):
    pre = as_state_dict(pretrained, name="pretrained")
    fts = {t: as_state_dict(m, name=f"finetuned[{t!r}]") for t, m in as_task_dict(finetuned).items()}
    check_same_keys(pre, fts)
    return pre, fts


def _apply(pre: dict, vector: dict, scaling: float) -> dict[str, torch.Tensor]:
    """``θ_0 + λ·τ`` for float entries; other entries are copied from ``θ_0``."""
    return {k: (v + scaling * vector[k]) if k in vector else v.clone() for k, v in pre.items()}


def multitask_vector(pretrained, finetuned, *, base="task_arithmetic", top_k=0.2, merge="sum"):
    """Build the (unscaled) multi-task vector ``τ_MT`` that a base merge adds to ``θ_0``.

    Parameters
    ----------
    pretrained : torch.nn.Module or dict of str to torch.Tensor
        The pretrained model ``θ_0``.
    finetuned : dict of str to (torch.nn.Module or dict) or list
        The fine-tuned models, one per task.
    base : {"task_arithmetic", "ties"}, default="task_arithmetic"
        ``Σ_t τ_t`` or the TIES-merged vector.
    top_k : float, default=0.2
        TIES only: fraction of each task vector's entries kept (by magnitude).
    merge : {"sum", "mean", "max"}, default="sum"
        TIES only: how the sign-agreeing entries are combined.

    Returns
    -------
    dict of str to torch.Tensor
        ``τ_MT``, one tensor per floating-point entry.

    Examples
    --------
    >>> import torch
    >>> pre = {"w": torch.zeros(2)}
    >>> multitask_vector(pre, [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([1.0, 3.0])}])
    {'w': tensor([2., 2.])}
    """
    pre, fts = _prepare(pretrained, finetuned)
    if base == "task_arithmetic":
        out = {}
        for k, v in pre.items():
            if is_mergeable(v):
                acc = torch.zeros_like(v)
                for ft in fts.values():
                    acc += ft[k].to(v.device) - v  # experts may live elsewhere (e.g. CPU)
                out[k] = acc
        return out
    if base == "ties":
        return _ties_vector(pre, fts, top_k=top_k, merge=merge)
    raise ValueError(f"unknown base {base!r}; expected 'task_arithmetic' or 'ties'")


def task_arithmetic(pretrained, finetuned, scaling=0.3):
    """Task Arithmetic: ``θ_0 + λ Σ_t (θ_t − θ_0)``.

    Parameters
    ----------
    pretrained : torch.nn.Module or dict of str to torch.Tensor
        The pretrained model ``θ_0``.
    finetuned : dict of str to (torch.nn.Module or dict) or list
        The fine-tuned models.
    scaling : float, default=0.3
        λ, the field's default for the 8-task CLIP suite.

    Returns
    -------
    dict of str to torch.Tensor
        A new state dict.

    Examples
    --------
    >>> import torch
    >>> task_arithmetic({"w": torch.zeros(1)}, [{"w": torch.ones(1)}, {"w": torch.ones(1)}], scaling=0.5)
    {'w': tensor([1.])}
    """
    pre, _ = _prepare(pretrained, finetuned)
    return _apply(pre, multitask_vector(pretrained, finetuned, base="task_arithmetic"), scaling)


def weight_averaging(finetuned, pretrained=None):
    """Simple weight averaging of the fine-tuned models (model soup).

    Parameters
    ----------
    finetuned : dict of str to (torch.nn.Module or dict) or list
        The fine-tuned models.
    pretrained : torch.nn.Module or dict, optional
        Where non-float entries come from; the first fine-tuned model when omitted.

    Returns
    -------
    dict of str to torch.Tensor

    Examples
    --------
    >>> import torch
    >>> weight_averaging([{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}])
    {'w': tensor([2.])}
    """
    fts = {t: as_state_dict(m, name=f"finetuned[{t!r}]") for t, m in as_task_dict(finetuned).items()}
    first = next(iter(fts.values()))
    ref = as_state_dict(pretrained, name="pretrained") if pretrained is not None else first
    check_same_keys(ref, fts)
    out = {}
    for k, v in ref.items():
        if is_mergeable(v):
            # summed in float32 at least: half-precision sums overflow (two fp16 40000s) and round
            acc = torch.zeros_like(v, dtype=torch.promote_types(v.dtype, torch.float32))
            for ft in fts.values():
                acc += ft[k].to(acc.device, acc.dtype)
            out[k] = (acc / len(fts)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def ties_merging(pretrained, finetuned, scaling=0.3, top_k=0.2, merge="sum"):
    """TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., 2023).

    Per task, entries below the task vector's global top-``top_k`` magnitude are zeroed
    (threshold over the whole model, as in the reference code); the sign of each entry is
    elected by the summed trimmed mass (entries with zero mass take the sign of the total);
    entries that agree with the elected sign are combined by ``merge``.

    The threshold is the reference implementation's: the ``(P − ⌊P·top_k⌋)``-th smallest
    magnitude (``torch.kthvalue``), keeping every entry ``>=`` it, so ``⌊P·top_k⌋ + 1`` entries
    are kept when magnitudes are distinct (one boundary entry more than ``top_k``), and all
    ties of the boundary value. FusionBench does the same.

    Parameters
    ----------
    pretrained : torch.nn.Module or dict of str to torch.Tensor
        The pretrained model.
    finetuned : dict of str to (torch.nn.Module or dict) or list
        The fine-tuned models.
    scaling : float, default=0.3
        λ applied to the merged vector.
    top_k : float, default=0.2
        Fraction of each task vector kept, in (0, 1].
    merge : {"sum", "mean", "max"}, default="sum"
        How agreeing entries are combined.

    Returns
    -------
    dict of str to torch.Tensor

    Examples
    --------
    >>> import torch
    >>> pre = {"w": torch.zeros(3)}
    >>> fts = [{"w": torch.tensor([1.0, -2.0, 0.1])}, {"w": torch.tensor([1.0, 1.0, 0.1])}]
    >>> ties_merging(pre, fts, scaling=1.0, top_k=0.5, merge="sum")
    {'w': tensor([ 2., -2.,  0.])}
    """
    pre, fts = _prepare(pretrained, finetuned)
    return _apply(pre, _ties_vector(pre, fts, top_k=top_k, merge=merge), scaling)


def ties_thresholds(pre: dict, fts: dict, top_k: float) -> dict[str, torch.Tensor]:
    """Per task, the magnitude threshold of TIES' global top-k trimming (one flattened task at a time).

    Parameters
    ----------
    pre : dict of str to torch.Tensor
        Pretrained state dict.
    fts : dict of str to (dict or callable)
        Fine-tuned state dicts, or zero-argument callables that load one.
    top_k : float
        Fraction of each task vector kept, in (0, 1].

    Returns
    -------
    dict of str to torch.Tensor
        The threshold per task.

    Examples
    --------
    >>> import torch
    >>> ties_thresholds({"w": torch.zeros(4)}, {"a": {"w": torch.tensor([1.0, -4.0, 2.0, 3.0])}}, 0.5)
    {'a': tensor(2.)}
    """
    _check_top_k(top_k)
    keys = [k for k, v in pre.items() if is_mergeable(v)]
    return {task: _threshold(pre, _load(src), keys, top_k) for task, src in fts.items()}


def _check_top_k(top_k):
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be in (0, 1], got {top_k!r}")


def _load(source) -> dict:
    """A state dict, or what a zero-argument loader returns (a checkpoint read on demand)."""
    return source() if callable(source) else source


def _threshold(pre, ft, keys, top_k):
    flat = torch.cat([(ft[k].to(pre[k].device) - pre[k]).abs().flatten() for k in keys])
    n = flat.numel()
    kth = n - int(n * top_k)
    return flat.kthvalue(max(kth, 1)).values


def _trimmed(pre, ft, k, threshold):
    tv = ft[k].to(pre[k].device) - pre[k]
    return tv * (tv.abs() >= threshold)


def _ties_vector(pre: dict, fts: dict, *, top_k: float, merge: str) -> dict[str, torch.Tensor]:
    """TIES' merged vector, reading the experts task by task (each one twice, one at a time).

    ``fts`` maps tasks to state dicts or to zero-argument loaders: with loaders, at most one
    expert is in memory at any time (the rest is a few model-sized accumulators), whatever the
    number of tasks. The sums run over tasks in the same order either way, so the result does not
    depend on how the experts are given.
    """
    if merge not in ("sum", "mean", "max"):
        raise ValueError(f"unknown merge {merge!r}; expected 'sum', 'mean' or 'max'")
    _check_top_k(top_k)
    keys = [k for k, v in pre.items() if is_mergeable(v)]

    # Pass 1, per task: its trimming threshold, then its trimmed mass summed into the election.
    thresholds = {}
    signs = {k: torch.zeros_like(pre[k]) for k in keys}
    for task, src in fts.items():
        ft = _load(src)
        thresholds[task] = _threshold(pre, ft, keys, top_k)
        for k in keys:
            signs[k] += _trimmed(pre, ft, k, thresholds[task])
        del ft
    # Elect signs from the summed trimmed mass; zeros take the sign of the grand total.
    total = 0.0
    for k in keys:
        signs[k] = torch.sign(signs[k])
        total += float(signs[k].sum())
    majority = float((total > 0) - (total < 0))  # torch.sign of the total, as the reference code
    for k in keys:
        signs[k][signs[k] == 0] = majority

    # Pass 2, per task: the entries that agree with the elected sign, combined by `merge`.
    acc = {k: torch.zeros_like(pre[k]) for k in keys}
    count = {k: torch.zeros_like(pre[k]) for k in keys} if merge == "mean" else None
    for task, src in fts.items():
        ft = _load(src)
        for k in keys:
            tv = _trimmed(pre, ft, k, thresholds[task])
            sel = tv * torch.where(signs[k] > 0, tv > 0, tv < 0)
            if merge == "max":
                torch.maximum(acc[k], sel.abs(), out=acc[k])
            else:
                acc[k] += sel
                if count is not None:
                    count[k] += (sel != 0).to(acc[k].dtype)
        del ft
    for k in keys:
        if merge == "mean":
            acc[k] = acc[k] / count[k].clamp(min=1)
        elif merge == "max":
            acc[k] = acc[k] * signs[k]
    return acc
