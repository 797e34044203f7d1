"""The benchmark's methods: one small factory per row of the table, all through the estimator API.

Every factory receives the zoo's models and the shared settings (base λ chosen on validation data,
seed, device) and returns an unfitted estimator. Settings are each method's published default
where there is one; the step counts are the benchmark's budget, the same for every learned method.
Every method built on Task Arithmetic starts from the same validation-chosen λ — AdaMerging
included (its coefficients start there instead of at the reference's 0.3, which was the best fixed
λ of *its* benchmark, not of this one).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..baselines import (
    AdaMerging,
    HeadFineTuning,
    IndividualExperts,
    PretrainedHeads,
    ProcrustesAlignment,
    RepresentationSurgery,
    TaskArithmetic,
    TiesMerging,
    WeightAveraging,
)
from ..merger import MOMAMerger

__all__ = ["METHODS", "MethodSettings", "make_method"]


@dataclass(frozen=True)
class MethodSettings:
    """What every method gets: base merge scales (chosen on validation data), budget, seed, device."""

    ta_scaling: float = 0.3
    ties_scaling: float = 0.3
    n_steps: int = 200
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"


def _moma(m, s: MethodSettings, **kw):
    base = kw.pop("base", "task_arithmetic")
    scaling = s.ties_scaling if base == "ties" else s.ta_scaling
    return MOMAMerger(
        *m,
        base=base,
        scaling=scaling,
        n_steps=s.n_steps,
        batch_size=s.batch_size,
        random_state=s.seed,
        device=s.device,
        **kw,
    )


METHODS = {
    "pretrained": lambda m, s: PretrainedHeads(*m),
    "individual": lambda m, s: IndividualExperts(*m),
    "weight_averaging": lambda m, s: WeightAveraging(*m),
    "task_arithmetic": lambda m, s: TaskArithmetic(*m, scaling=s.ta_scaling),
    "ties": lambda m, s: TiesMerging(*m, scaling=s.ties_scaling, top_k=0.2),
    "adamerging_taskwise": lambda m, s: AdaMerging(
        *m,
        granularity="task",
        init_scaling=s.ta_scaling,
        n_steps=s.n_steps,
        lr=1e-3,
        batch_size=s.batch_size,
        random_state=s.seed,
        device=s.device,
    ),
    "adamerging_layerwise": lambda m, s: AdaMerging(
        *m,
        granularity="layer",
        init_scaling=s.ta_scaling,
        n_steps=s.n_steps,
        lr=1e-3,
        batch_size=s.batch_size,
        random_state=s.seed,
        device=s.device,
    ),
    "surgery": lambda m, s: RepresentationSurgery(
        *m,
        scaling=s.ta_scaling,
        rank=16,
        n_steps=s.n_steps,
        lr=1e-3,
        batch_size=s.batch_size,
        random_state=s.seed,
        device=s.device,
    ),
    "ft_classifier": lambda m, s: HeadFineTuning(
        *m,
        scaling=s.ta_scaling,
        n_steps=s.n_steps,
        lr=5e-4,
        batch_size=s.batch_size,
        random_state=s.seed,
        device=s.device,
    ),
    "procrustes": lambda m, s: ProcrustesAlignment(*m, scaling=s.ta_scaling, device=s.device),
    "moma_mask_only": lambda m, s: _moma(m, s, learn_rotations=False),
    "moma_rotation_only": lambda m, s: _moma(m, s, learn_mask=False),
    "moma": lambda m, s: _moma(m, s),
    "moma_ties": lambda m, s: _moma(m, s, base="ties"),
    "moma_procrustes_init": lambda m, s: _moma(m, s, rotation_init="procrustes"),
}

#: methods that learn from the unlabeled fit data
DATA_METHODS = {
    "adamerging_taskwise",
    "adamerging_layerwise",
    "surgery",
    "ft_classifier",
    "procrustes",
    "moma_mask_only",
    "moma_rotation_only",
    "moma",
    "moma_ties",
    "moma_procrustes_init",
}


def make_method(name: str, models, settings: MethodSettings):
    """An unfitted estimator for method ``name`` on ``models = (pretrained, experts, heads)``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name](models, settings)
