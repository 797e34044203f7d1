"""Loaders for the checkpoint releases the model-merging literature uses.

Both return ``(pretrained_encoder, {task: finetuned_encoder}, {task: head})``, the
arguments of :class:`momaestimator.merger.MOMAMerger`, with today's open_clip image
towers and :class:`~momaestimator.models.LinearHead` heads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from momaestimator.checkpoints.errors import CheckpointError
from momaestimator.checkpoints.files import read_checkpoint
from momaestimator.checkpoints.openclip import checkpoint_state, encoder_from_state_dict
from momaestimator.checkpoints.safe_pickle import LegacyObject, legacy_state_dict
from momaestimator.models import LinearHead

__all__ = [
    "TALL_MASKS_TASKS",
    "TASK_VECTORS_TASKS",
    "canonical_task_name",
    "head_from_checkpoint",
    "load_tall_masks_release",
    "load_task_vectors_release",
    "release_task_names",
]

#: The eight tasks of the task_vectors release, in its order.
TASK_VECTORS_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")

#: The TALL-masks / TSV / Iso release's tasks; its 8-, 14- and 20-task benchmarks are prefixes.
TALL_MASKS_TASKS = (
    "Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397",
    "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013",
    "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST",
)  # fmt: skip

_EXTRA_ALIASES = {
    "Cars": ("stanfordcars", "stanford_cars", "cars196"),
    "RESISC45": ("resisc", "nwpuresisc45"),
    "DTD": ("describabletextures",),
    "OxfordIIITPet": ("pets", "oxfordpets", "oxfordiiitpets", "oxford_iiit_pet"),
    "Flowers102": ("flowers", "oxfordflowers", "oxfordflowers102"),
    "PCAM": ("patchcamelyon",),
    "FER2013": ("fer",),
    "Food101": ("food",),
    "RenderedSST2": ("sst2", "renderedsst"),
    "EMNIST": ("emnistletters",),
}


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


_ALIASES = {_key(task): task for task in TALL_MASKS_TASKS}
_ALIASES.update({_key(alias): task for task, aliases in _EXTRA_ALIASES.items() for alias in aliases})


def canonical_task_name(name: str) -> str | None:
    """The release's spelling of a task name, matched case- and punctuation-insensitively.

    A trailing ``Val`` (the TALL-masks folder suffix) is ignored.

    Parameters
    ----------
    name : str
        A task name such as ``"stanford_cars"``, ``"sun397"`` or ``"EuroSATVal"``.

    Returns
    -------
    str or None
        The canonical name, or ``None`` for a task no release knows.

    Examples
    --------
    >>> from momaestimator.checkpoints import canonical_task_name
    >>> canonical_task_name("stanford_cars"), canonical_task_name("eurosat"), canonical_task_name("GTSRBVal")
    ('Cars', 'EuroSAT', 'GTSRB')
    """
    key = _key(name)
    if key in _ALIASES:
        return _ALIASES[key]
    if key.endswith("val") and key[:-3] in _ALIASES:
        return _ALIASES[key[:-3]]
    return None


def _same_task(a: str, b: str) -> bool:
    ca, cb = canonical_task_name(a), canonical_task_name(b)
    return (ca or _key(a)) == (cb or _key(b))


def _resolve_tasks(tasks, default, lists=None) -> list[str]:
    if tasks is None:
        return list(default)
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if lists is None:
            raise ValueError(f"tasks={tasks}: this release takes a list of task names, not a number of tasks")
        if tasks not in lists:
            raise ValueError(f"tasks={tasks}: expected a list of task names or one of {sorted(lists)}")
        return list(lists[tasks])
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [canonical_task_name(t) or t for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tasks name the same task more than once: {dupes}")
    if not names:
        raise ValueError("tasks is empty")
    return names


def release_task_names(release: str, tasks=None) -> list[str]:
    """The task names a release loader reads for ``tasks``, without touching any file.

    Parameters
    ----------
    release : {"task_vectors", "tall_masks"}
        The release layout.
    tasks : list of str, int or None
        As the loaders take it (``None``: the release's default tasks; an int: the TALL-masks
        8/14/20-task suites).

    Returns
    -------
    list of str
        Canonical task names, in the loader's order.

    Examples
    --------
    >>> release_task_names("tall_masks", 14)[-2:]
    ['PCAM', 'FER2013']
    >>> release_task_names("task_vectors", ["mnist", "stanford_cars"])
    ['MNIST', 'Cars']
    """
    if release == "tall_masks":
        return _resolve_tasks(tasks, TALL_MASKS_TASKS[:8], {n: TALL_MASKS_TASKS[:n] for n in (8, 14, 20)})
    if release == "task_vectors":
        return _resolve_tasks(tasks, TASK_VECTORS_TASKS)
    raise ValueError(f"unknown release {release!r}; expected 'task_vectors' or 'tall_masks'")


def _find(parent: Path, task: str, *, prefix="", suffix="", is_dir: bool) -> Path | None:
    """The entry of ``parent`` for ``task``: ``<prefix><Task><suffix>``, any spelling of the task."""
    exact = parent / f"{prefix}{task}{suffix}"
    if exact.is_dir() if is_dir else exact.is_file():
        return exact
    if not parent.is_dir():
        return None
    lo_prefix, lo_suffix = prefix.lower(), suffix.lower()
    for entry in sorted(parent.iterdir()):
        name = entry.name.lower()
        if entry.is_dir() != is_dir or not (name.startswith(lo_prefix) and name.endswith(lo_suffix)):
            continue
        core = entry.name[len(prefix) : len(entry.name) - len(suffix)]
        if core and _same_task(core, task):
            return entry
    return None


def _model_dir(root, model: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"release root {root} is not a directory")
    model_dir = root / model
    if not model_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no {model!r} folder in {root}; it has: {present}")
    return model_dir


def head_from_checkpoint(checkpoint, source: str = "head") -> LinearHead:
    """Convert a release classification head to a :class:`~momaestimator.models.LinearHead`.

    Parameters
    ----------
    checkpoint : LegacyObject, torch.nn.Module or mapping
        A pickled ``ClassificationHead`` (as read by
        :func:`~momaestimator.checkpoints.load_legacy_pickle`), a live ``nn.Linear`` /
        ``ClassificationHead``, or a ``{"weight", "bias"}`` state dict (taken as a release
        head, i.e. applied to normalised features).
    source : str, default="head"
        Where it came from, for error messages.

    Returns
    -------
    LinearHead
        Same weight, bias and ``normalize`` flag (``False`` for a plain ``nn.Linear``).

    Examples
    --------
    >>> import torch
    >>> from momaestimator.checkpoints import head_from_checkpoint
    >>> head_from_checkpoint({"weight": torch.eye(2), "bias": torch.zeros(2)})
    LinearHead(in_features=2, out_features=2, normalize=True)
    """
    if isinstance(checkpoint, LegacyObject):
        try:
            state = legacy_state_dict(checkpoint)
        except TypeError as err:
            raise CheckpointError(f"{source} does not hold a classification head: {err}") from err
        normalize = checkpoint.__dict__.get("normalize", type(checkpoint).legacy_class.endswith("ClassificationHead"))
    elif isinstance(checkpoint, nn.Module):
        state = checkpoint.state_dict()
        normalize = getattr(checkpoint, "normalize", False)
    elif isinstance(checkpoint, Mapping):
        state = checkpoint
        normalize = True
    else:
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a classification head")
    weight = state.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise CheckpointError(f"{source} has no 2-D 'weight' (keys: {sorted(state, key=str)})")
    if not weight.is_floating_point() or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise CheckpointError(
            f"{source}: the head's weight is {weight.dtype} of shape {tuple(weight.shape)}; a classification head "
            "has a floating-point weight with one row per class (at least one) and one column per feature"
        )
    try:
        return LinearHead(weight, state.get("bias"), normalize=bool(normalize))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err


def _check_files(files: dict[str, Path], what: str, where: Path, missing: list[str] | None = None) -> None:
    """Raise one FileNotFoundError listing every missing file (and the ``missing`` already found)."""
    missing = list(missing or []) + [f"{name} ({path})" for name, path in files.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{what} in {where}: missing {'; '.join(missing)}")


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)


def _load_release(arch, zeroshot, finetuned, heads, quick_gelu):
    state, detected, source = checkpoint_state(zeroshot)
    # Both releases fine-tuned OpenAI's CLIP, trained with QuickGELU; a pickled tower says so itself.
    # Order: the argument, the pickled tower, the config's entry (as load_open_clip_encoder), True.
    configured = arch.get("quick_gelu") if isinstance(arch, Mapping) else None
    fallback = bool(configured) if configured is not None else True
    activation = quick_gelu if quick_gelu is not None else (detected if detected is not None else fallback)
    pretrained = encoder_from_state_dict(arch, state, quick_gelu=activation, source=source)
    del state
    encoders = {}
    for task, path in finetuned.items():
        state, detected, source = checkpoint_state(path)
        if quick_gelu is None and detected is not None and detected != activation:
            raise CheckpointError(f"{source} uses {'QuickGELU' if detected else 'GELU'}, unlike {zeroshot}")
        encoders[task] = encoder_from_state_dict(arch, state, quick_gelu=activation, source=source)
        del state
    embed_dim = pretrained.output_dim if hasattr(pretrained, "output_dim") else None
    loaded_heads = {}
    for task, path in heads.items():
        head = head_from_checkpoint(read_checkpoint(path), source=str(path))
        if embed_dim is not None and head.in_features != embed_dim:
            raise CheckpointError(f"{path}: head takes {head.in_features} features, the encoder gives {embed_dim}")
        loaded_heads[task] = head
    # One dtype for the whole release, the zero-shot checkpoint's: fine-tuned towers saved in
    # half precision next to a float32 zero-shot one (or float32 heads next to fp16 towers)
    # would otherwise meet in one forward pass.
    dtype = _floating_dtype(pretrained)
    if dtype is not None:
        for module in (*encoders.values(), *loaded_heads.values()):
            if _floating_dtype(module) not in (None, dtype):
                module.to(dtype)
    return pretrained, encoders, loaded_heads


def load_task_vectors_release(root, model="ViT-B-32", tasks=None, *, model_cfg=None, quick_gelu=None):
    """Load the task_vectors release (Ilharco et al.) for merging.

    Layout: ``<root>/<model>/zeroshot.pt``, ``<root>/<model>/<Task>/finetuned.pt`` and
    ``<root>/<model>/head_<Task>.pt``. The encoders are whole pickled
    ``src.modeling.ImageEncoder`` objects of open_clip 2.0.2, read with the restricted
    unpickler (plain state dicts in the same places are read with ``weights_only=True``);
    the heads are pickled ``src.modeling.ClassificationHead`` objects. Everything is returned
    in the floating dtype of ``zeroshot.pt``: fine-tuned towers or heads saved in another one
    (e.g. float16 next to a float32 zero-shot tower) are cast to it.

    Parameters
    ----------
    root : str or os.PathLike
        Folder holding one sub-folder per architecture.
    model : str, default="ViT-B-32"
        Architecture folder and open_clip architecture name (``ViT-B-32``, ``ViT-B-16``,
        ``ViT-L-14``).
    tasks : list of str or None, default=None
        Tasks to load, in this order; names match case-insensitively with aliases
        (``"stanford_cars"`` is ``"Cars"``). ``None``: the release's eight tasks in its order,
        :data:`TASK_VECTORS_TASKS`.
    model_cfg : dict or None, default=None
        An open_clip model config (``embed_dim``, ``vision_cfg``) to use instead of looking
        ``model`` up in open_clip, e.g. for a custom or tiny architecture.
    quick_gelu : bool or None, default=None
        Activation of the towers. ``None``: read off the pickled tower, else the ``"quick_gelu"``
        entry of ``model_cfg`` if it has one, else ``True`` as for the OpenAI-initialised
        release.

    Returns
    -------
    pretrained_encoder : torch.nn.Module
        The zero-shot image tower (today's ``open_clip.transformer.VisionTransformer``).
    finetuned_encoders : dict of str to torch.nn.Module
        One fine-tuned tower per task, keyed by canonical task name.
    heads : dict of str to LinearHead
        One classification head per task (``normalize=True``, logit scale folded in).

    Raises
    ------
    FileNotFoundError
        Listing every missing file (zero-shot, fine-tuned and head files together) before
        anything is loaded.
    UnsafeCheckpointError, CorruptCheckpointError, CheckpointError
        See :func:`~momaestimator.checkpoints.load_legacy_pickle` and
        :func:`~momaestimator.checkpoints.load_open_clip_encoder`.

    Examples
    --------
    With the release downloaded to ``checkpoints/``:

    >>> from momaestimator import MOMAMerger
    >>> pretrained, finetuned, heads = load_task_vectors_release("checkpoints")  # doctest: +SKIP
    >>> merger = MOMAMerger(pretrained, finetuned, heads, device="cuda")  # doctest: +SKIP

    Missing files are listed before anything is loaded:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     try:
    ...         load_task_vectors_release(tmp)
    ...     except FileNotFoundError as err:
    ...         print("ViT-B-32" in str(err))
    True
    """
    model_dir = _model_dir(root, model)
    names = release_task_names("task_vectors", tasks)
    finetuned, heads = {}, {}
    for task in names:
        folder = _find(model_dir, task, is_dir=True)
        finetuned[task] = folder / "finetuned.pt" if folder is not None else model_dir / task / "finetuned.pt"
        heads[task] = _find(model_dir, task, prefix="head_", suffix=".pt", is_dir=False) or (
            model_dir / f"head_{task}.pt"
        )
    zeroshot = model_dir / "zeroshot.pt"
    head_files = {f"head of {t}": p for t, p in heads.items()}
    _check_files({"zeroshot.pt": zeroshot, **finetuned, **head_files}, "task_vectors release", model_dir)
    return _load_release(model_cfg if model_cfg is not None else model, zeroshot, finetuned, heads, quick_gelu)


def load_tall_masks_release(root, model="ViT-B-32", tasks=None, *, model_cfg=None, quick_gelu=None):
    """Load the TALL-masks / TSV / Iso release (Wang et al.) for merging.

    Layout: ``<root>/<model>/<Task>Val/nonlinear_finetuned.pt`` (plain state dicts with
    ``model.*`` keys, read with ``weights_only=True``), ``nonlinear_zeroshot.pt`` (in
    ``<model>/``, ``MNISTVal/`` as the release's code expects, or any task folder), and
    pickled ``src.models.modeling.ClassificationHead`` heads ``<root>/<model>/head_<Task>Val.pt``.

    Parameters
    ----------
    root : str or os.PathLike
        Folder holding one sub-folder per architecture (the release's ``single_task`` folder).
    model : str, default="ViT-B-32"
        Architecture folder and open_clip architecture name.
    tasks : int or list of str or None, default=None
        ``8``, ``14`` or ``20`` for the release's benchmarks (prefixes of
        :data:`TALL_MASKS_TASKS`), or task names (case-insensitive, with aliases).
        ``None``: the 8-task benchmark.
    model_cfg : dict or None, default=None
        An open_clip model config to use instead of looking ``model`` up.
    quick_gelu : bool or None, default=None
        Activation of the towers. ``None``: the ``"quick_gelu"`` entry of ``model_cfg`` if it
        has one, else ``True`` (OpenAI-initialised release).

    Returns
    -------
    pretrained_encoder, finetuned_encoders, heads
        As :func:`load_task_vectors_release`, all in the dtype of ``nonlinear_zeroshot.pt``.

    Raises
    ------
    FileNotFoundError
        Listing every missing file (zero-shot, fine-tuned and head files together) before
        anything is loaded.
    UnsafeCheckpointError, CorruptCheckpointError, CheckpointError
        As :func:`load_task_vectors_release`.

    Examples
    --------
    >>> pretrained, finetuned, heads = load_tall_masks_release("checkpoints", tasks=None)  # doctest: +SKIP

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     try:
    ...         load_tall_masks_release(tmp, tasks=["MNIST", "SVHN"])
    ...     except FileNotFoundError as err:
    ...         print("ViT-B-32" in str(err))
    True
    """
    model_dir = _model_dir(root, model)
    names = release_task_names("tall_masks", tasks)
    finetuned, heads = {}, {}
    for task in names:
        folder = _find(model_dir, task, suffix="Val", is_dir=True)
        finetuned[task] = (folder or model_dir / f"{task}Val") / "nonlinear_finetuned.pt"
        heads[task] = _find(model_dir, task, prefix="head_", suffix="Val.pt", is_dir=False) or (
            model_dir / f"head_{task}Val.pt"
        )
    candidates = [model_dir / "nonlinear_zeroshot.pt"]
    candidates += [d / "nonlinear_zeroshot.pt" for d in (_find(model_dir, "MNIST", suffix="Val", is_dir=True),) if d]
    candidates += [p.parent / "nonlinear_zeroshot.pt" for p in finetuned.values()]
    candidates += sorted(model_dir.glob("*/nonlinear_zeroshot.pt"))
    zeroshot = next((p for p in candidates if p.is_file()), None)
    missing = [] if zeroshot is not None else ["nonlinear_zeroshot.pt (in it or any of its task folders)"]
    head_files = {f"head of {t}": p for t, p in heads.items()}
    _check_files({**finetuned, **head_files}, "TALL-masks release", model_dir, missing)
    return _load_release(model_cfg if model_cfg is not None else model, zeroshot, finetuned, heads, quick_gelu)
