"""Fitting objectives: what the merged model is pulled towards on unlabeled data."""

from __future__ import annotations

import torch.nn.functional as F

__all__ = ["OBJECTIVES", "entropy", "feature_alignment", "kl_to_teacher"]


def kl_to_teacher(student_logits, teacher_logits, student_features=None, teacher_features=None):
    """``mean_x KL(softmax(teacher) ‖ softmax(student))`` — MOMA's default, no labels, no temperature.

    Parameters
    ----------
    student_logits : torch.Tensor of shape (batch, n_classes)
        Logits of the merged model (after the rotation).
    teacher_logits : torch.Tensor of shape (batch, n_classes)
        Logits of the fine-tuned expert with its head.
    student_features, teacher_features : torch.Tensor, optional
        Unused; every objective takes the same arguments.

    Returns
    -------
    torch.Tensor
        A scalar.

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[1.0, 2.0]])
    >>> float(kl_to_teacher(logits, logits))
    0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    t = F.log_softmax(teacher_logits, dim=-1)
    s = F.log_softmax(student_logits, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def entropy(student_logits, teacher_logits=None, student_features=None, teacher_features=None):
    """Mean prediction entropy (AdaMerging's objective; needs no teacher).

    Parameters
    ----------
    student_logits : torch.Tensor of shape (batch, n_classes)
        Logits of the merged model.
    teacher_logits, student_features, teacher_features : torch.Tensor, optional
        Unused; every objective takes the same arguments.

    Returns
    -------
    torch.Tensor
        A scalar.

    Examples
    --------
    >>> import torch
    >>> round(float(entropy(torch.zeros(1, 2))), 4)
    0.6931
    """
    logp = F.log_softmax(student_logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def feature_alignment(student_logits, teacher_logits, student_features, teacher_features):
    """Mean squared distance between L2-normalised (rotated) merged and fine-tuned features.

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor or None
        Unused; every objective takes the same arguments.
    student_features : torch.Tensor of shape (batch, d)
        Merged features after the rotation.
    teacher_features : torch.Tensor of shape (batch, d)
        The fine-tuned expert's features.

    Returns
    -------
    torch.Tensor
        A scalar.

    Examples
    --------
    >>> import torch
    >>> z = torch.tensor([[3.0, 4.0]])
    >>> float(feature_alignment(None, None, z, 2 * z))
    0.0
    """
    s = F.normalize(student_features, dim=-1)
    t = F.normalize(teacher_features, dim=-1)
    return ((s - t) ** 2).sum(-1).mean()


#: name → (loss function, whether it needs the teacher's features, whether it needs teacher logits)
OBJECTIVES = {
    "kl": (kl_to_teacher, False, True),
    "entropy": (entropy, False, False),
    "feature": (feature_alignment, True, False),
}
