"""Saving and loading a merged model: safetensors weights plus a JSON description."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from momaestimator.checkpoints.errors import CheckpointError
from momaestimator.checkpoints.files import _corrupt, _sniff, atomic_write
from momaestimator.checkpoints.openclip import build_open_clip_encoder, infer_open_clip_config
from momaestimator.models import LinearHead, MergedModel

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_merged_model", "save_merged_model"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
_FORMAT = "momaestimator.merged_model"
_FORMAT_VERSION = 2  # 2: nn.Linear heads stay nn.Linear (with or without bias); 1: LinearHead only


def _uses_quick_gelu(encoder: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in encoder.modules())


def _encoder_spec(encoder: nn.Module, architecture) -> dict:
    quick_gelu = _uses_quick_gelu(encoder)
    if architecture is None:
        cfg = infer_open_clip_config(encoder)
        quick_gelu = cfg.pop("quick_gelu")
        spec = {"library": "open_clip", "model_name": None, "model_cfg": cfg, "quick_gelu": quick_gelu}
    elif isinstance(architecture, str):
        spec = {
            "library": "open_clip",
            "model_name": architecture,
            "model_cfg": None,
            "quick_gelu": quick_gelu,
        }
    elif isinstance(architecture, dict):
        cfg = {k: v for k, v in architecture.items() if k != "quick_gelu"}
        spec = {"library": "open_clip", "model_name": None, "model_cfg": cfg, "quick_gelu": quick_gelu}
    else:
        raise TypeError(f"architecture must be None, an open_clip name or a config dict, got {architecture!r}")
    rebuilt = _build_encoder(spec, device="meta")
    got = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if type(rebuilt) is not type(encoder) or got != want:
        raise ValueError(
            f"the encoder ({type(encoder).__name__}) is not the open_clip image tower of architecture "
            f"{architecture!r}; pass the architecture it was built with (an open_clip name or config dict)"
        )
    return spec


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable or not JSON: it differs from the stored description
        return None


def _build_encoder(spec: dict, device=None) -> nn.Module:
    if spec.get("library") != "open_clip":
        raise CheckpointError(f"unsupported encoder library {spec.get('library')!r}")
    arch = spec["model_name"] if spec.get("model_name") else spec["model_cfg"]
    return build_open_clip_encoder(arch, quick_gelu=spec["quick_gelu"], device=device)


def _head_spec(task: str, head: nn.Module) -> dict:
    if isinstance(head, LinearHead):
        return {
            "type": "LinearHead",
            "n_classes": head.out_features,
            "n_features": head.in_features,
            "normalize": head.normalize,
        }
    if type(head) is nn.Linear:  # kept an nn.Linear, with or without its bias (format version 2)
        return {
            "type": "Linear",
            "n_classes": head.out_features,
            "n_features": head.in_features,
            "normalize": False,
            "bias": head.bias is not None,
        }
    raise ValueError(f"head {task!r} is a {type(head).__name__}; only LinearHead and nn.Linear heads are saved")


def _build_head(spec: dict, weight: torch.Tensor, bias) -> nn.Module:
    if spec.get("type", "LinearHead") == "LinearHead":
        return LinearHead(weight, bias, normalize=spec["normalize"])
    if spec["type"] != "Linear" or bool(spec.get("bias")) != (bias is not None):
        raise CheckpointError(f"head description {spec} does not match its tensors (bias: {bias is not None})")
    head = nn.Linear(spec["n_features"], spec["n_classes"], bias=bias is not None, device="meta")
    head.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})}, assign=True)
    return head


def save_merged_model(model: MergedModel, path, *, architecture=None) -> Path:
    """Save a merged model as ``model.safetensors`` plus ``model.json`` in a folder.

    The JSON names the open_clip architecture of the encoder (name or config, and its
    activation) and each task's head (class count, feature count, ``normalize``); the
    same description is stored in the safetensors header, so the weights file alone is
    enough to load the model. Each file is written atomically.

    Parameters
    ----------
    model : MergedModel
        An open_clip image tower with :class:`~momaestimator.models.LinearHead` (or
        ``nn.Linear``) heads, as returned by ``MOMAMerger.transform``.
    path : str or os.PathLike
        Output folder, created if needed.
    architecture : str or dict or None, default=None
        The encoder's open_clip architecture name or model config. ``None`` infers the
        config from the module (plain ViT towers).

    Returns
    -------
    pathlib.Path
        The folder.

    Examples
    --------
    >>> import tempfile, torch
    >>> from momaestimator.models import LinearHead, MergedModel
    >>> from momaestimator.checkpoints import build_open_clip_encoder, load_merged_model, save_merged_model
    >>> tiny = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
    ...                                       "layers": 1, "head_width": 8}}
    >>> model = MergedModel(build_open_clip_encoder(tiny), {"mnist": LinearHead(torch.randn(10, 8))})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_merged_model(model, tmp, architecture=tiny)
    ...     loaded = load_merged_model(tmp)
    >>> all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    True
    """
    from safetensors.torch import save_file

    if not isinstance(model, MergedModel):
        raise TypeError(f"expected a MergedModel, got {type(model).__name__}")
    config = {
        "format": _FORMAT,
        "format_version": 1,
        "encoder": _encoder_spec(model.encoder, architecture),
        "tasks": list(model.heads.keys()),
        "heads": {task: _head_spec(task, head) for task, head in model.heads.items()},
    }
    if any(h["type"] == "Linear" for h in config["heads"].values()):
        config["format_version"] = _FORMAT_VERSION  # readers of version 1 would give them a bias
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory; the merged model has none unless a
        # user tied weights, and a copy keeps such a file loadable.
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[key] = tensor
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2)
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"momaestimator": text}))
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def load_merged_model(path) -> MergedModel:
    """Load a model written by :func:`save_merged_model`.

    Parameters
    ----------
    path : str or os.PathLike
        The folder, or its ``model.safetensors``.

    Returns
    -------
    MergedModel
        In eval mode, with the saved tensors bit for bit.

    Raises
    ------
    CorruptCheckpointError
        If the weights file is truncated or corrupt.
    CheckpointError
        If the file is not a momaestimator merged model (not a safetensors file, or one
        without its description) or its tensors do not match its description.

    Examples
    --------
    >>> import tempfile, torch
    >>> from momaestimator.models import LinearHead, MergedModel
    >>> from momaestimator.checkpoints import build_open_clip_encoder, load_merged_model, save_merged_model
    >>> tiny = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
    ...                                       "layers": 1, "head_width": 8}}
    >>> model = MergedModel(build_open_clip_encoder(tiny), {"mnist": LinearHead(torch.randn(10, 8))})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_merged_model(model, tmp, architecture=tiny)
    ...     loaded = load_merged_model(tmp)
    >>> loaded.tasks, loaded(torch.zeros(2, 3, 16, 16), "mnist").shape
    (['mnist'], torch.Size([2, 10]))
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    kind = _sniff(weights)
    if kind != "safetensors":
        raise CheckpointError(
            f"{weights} is not a merged model: save_merged_model writes a safetensors file ({WEIGHTS_FILE}), "
            f"this is a {'torch.save archive' if kind == 'zip' else 'pickle'}. Load checkpoints with "
            "load_open_clip_encoder or the release loaders."
        )
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise _corrupt(weights, "is not a readable safetensors file", err) from err
    if "momaestimator" not in metadata:
        raise CheckpointError(f"{weights} was not written by save_merged_model (no momaestimator metadata)")
    try:
        return _merged_model_from(weights, metadata, tensors)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:  # JSONDecodeError included
        raise CheckpointError(
            f"{weights}: its description (safetensors metadata 'momaestimator') is malformed "
            f"({type(err).__name__}: {err}); it was not written by save_merged_model, or was edited"
        ) from err


def _merged_model_from(weights: Path, metadata: dict, tensors: dict) -> MergedModel:
    """The model that ``metadata`` describes, holding ``tensors`` (raises on any mismatch)."""
    config = json.loads(metadata["momaestimator"])
    if config.get("format") != _FORMAT or config.get("format_version", 0) > _FORMAT_VERSION:
        raise CheckpointError(f"{weights}: unsupported format {config.get('format')!r} v{config.get('format_version')}")
    sidecar = weights.parent / CONFIG_FILE
    if sidecar.is_file() and _read_json(sidecar) != config:
        warnings.warn(
            f"{sidecar} differs from the description stored in {weights.name}; using the latter", stacklevel=2
        )

    encoder = _build_encoder(config["encoder"], device="meta")
    encoder_state = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
    expected = set(encoder.state_dict())
    if set(encoder_state) != expected:
        missing, unexpected = sorted(expected - set(encoder_state)), sorted(set(encoder_state) - expected)
        raise CheckpointError(
            f"{weights}: encoder tensors do not match the described architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    encoder.load_state_dict(encoder_state, strict=True, assign=True)
    heads = {}
    for task in config["tasks"]:
        spec = config["heads"][task]
        weight = tensors.get(f"heads.{task}.weight")
        if weight is None or tuple(weight.shape) != (spec["n_classes"], spec["n_features"]):
            raise CheckpointError(f"{weights}: head {task!r} does not match its description {spec}")
        heads[task] = _build_head(spec, weight, tensors.get(f"heads.{task}.bias"))
    return MergedModel(encoder.eval(), heads).eval()
