"""open_clip image towers: build one by architecture, map checkpoint weights onto it.

Every loader of this package returns today's ``open_clip.transformer.VisionTransformer``
(or whatever image tower open_clip builds for the architecture), so the encoders drop
into current open_clip code whatever version wrote the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
from collections.abc import Mapping

import open_clip
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from momaestimator.checkpoints.errors import CheckpointError
from momaestimator.checkpoints.files import _as_tensor_dict, read_checkpoint
from momaestimator.checkpoints.safe_pickle import LegacyObject, legacy_modules, legacy_state_dict

__all__ = [
    "build_open_clip_encoder",
    "infer_open_clip_config",
    "load_open_clip_encoder",
    "open_clip_model_config",
]

# Leftovers of the text tower next to ``visual.`` in a CLIP state dict: the releases deleted
# ``model.transformer`` but kept these (see docs/checkpoints.md).
_TEXT_KEYS = (
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "ln_final.bias",
    "text_projection",
    "logit_scale",
    "logit_bias",
    "attn_mask",
)
_TEXT_PREFIXES = ("transformer.", "text.")


def open_clip_model_config(model) -> dict:
    """Resolve an architecture to an open_clip model config.

    Parameters
    ----------
    model : str or dict
        An open_clip architecture name (``"ViT-B-32"``, see ``open_clip.list_models()``),
        or a model config dict with ``embed_dim`` and ``vision_cfg`` (and optionally
        ``quick_gelu``), as in open_clip's ``model_configs/*.json``.

    Returns
    -------
    dict
        A deep copy of the config.

    Examples
    --------
    >>> from momaestimator.checkpoints import open_clip_model_config
    >>> open_clip_model_config("ViT-B-32")["vision_cfg"]
    {'image_size': 224, 'layers': 12, 'width': 768, 'patch_size': 32}
    """
    if isinstance(model, str):
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            close = difflib.get_close_matches(model, open_clip.list_models(), n=5)
            hint = f"; close matches: {close}" if close else ""
            raise ValueError(f"unknown open_clip architecture {model!r}{hint}")
        return copy.deepcopy(cfg)
    if isinstance(model, Mapping):
        if "vision_cfg" not in model or "embed_dim" not in model:
            raise ValueError(
                f"a model config needs 'embed_dim' and 'vision_cfg' (as open_clip's model_configs/*.json); "
                f"got keys {sorted(model)}"
            )
        return copy.deepcopy(dict(model))
    raise TypeError(f"model must be an open_clip architecture name or a config dict, got {type(model).__name__}")


def build_open_clip_encoder(model, *, quick_gelu=None, device=None) -> nn.Module:
    """Build only the image tower of an open_clip architecture.

    Parameters
    ----------
    model : str or dict
        Architecture name or model config, see :func:`open_clip_model_config`.
    quick_gelu : bool or None, default=None
        Use QuickGELU activations (OpenAI-trained CLIPs). ``None`` takes the config's
        ``quick_gelu`` entry (false when absent).
    device : torch.device or str or None, default=None
        Where to create the parameters; ``"meta"`` builds without allocating or initialising
        them, for weights to be assigned afterwards.

    Returns
    -------
    torch.nn.Module
        The tower open_clip would build (a ``VisionTransformer`` for ViT architectures),
        randomly initialised unless ``device="meta"``.

    Examples
    --------
    >>> import torch
    >>> from momaestimator.checkpoints import build_open_clip_encoder
    >>> tiny = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
    ...                                       "layers": 1, "head_width": 8}}
    >>> encoder = build_open_clip_encoder(tiny)
    >>> encoder(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 8])
    """
    cfg = open_clip_model_config(model)
    quick_gelu = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        # open_clip has no public builder for the image tower alone; this is the function its
        # CLIP.__init__ calls, so the tower is exactly the one open_clip builds.
        return open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu)


def _architecture_label(model) -> str:
    return model if isinstance(model, str) else "the given model config"


def _split_prefix(state: Mapping, expected: Mapping[str, tuple]) -> str:
    """Find the key prefix under which ``state`` holds the tower's keys (``model.visual.``...).

    Keys count for a prefix only with the expected shape, so that a text tower kept next to the
    image tower (``transformer.resblocks.*`` at the top level of a CLIP) does not win.
    """
    counts: dict[str, int] = {}
    for prefix, _ in _shape_matches(state, expected):
        counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        # Nothing has the right shape: still find the prefix, for the mismatch report.
        for key in state:
            parts = key.split(".")
            for i in range(len(parts)):
                if ".".join(parts[i:]) in expected:
                    prefix = ".".join(parts[:i]) + ("." if i else "")
                    counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return ""
    return max(counts, key=lambda p: (counts[p], p.endswith("visual."), -len(p)))


def _describe_vit(visual: Mapping) -> str:
    """A short guess of the ViT architecture a state dict holds, for error messages."""
    try:
        width, _, patch, _ = visual["conv1.weight"].shape
        layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
        grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
        embed = visual["proj"].shape[1]
    except (KeyError, ValueError, AttributeError, IndexError):
        return ""
    found = {"image_size": patch * grid, "patch_size": patch, "width": width, "layers": layers}
    names = [
        name
        for name in open_clip.list_models()
        if (cfg := open_clip.get_model_config(name))
        and cfg.get("embed_dim") == embed
        and all(cfg["vision_cfg"].get(k) == v for k, v in found.items())
    ]
    # Plain CLIP names first: ViT-B-32 rather than coca_ViT-B-32.
    names.sort(key=lambda name: (not name.startswith("ViT-"), len(name), name))
    guess = f"; it looks like {' / '.join(names[:3])}" if names else ""
    return f" The checkpoint holds a ViT with {found} and embed_dim={embed}{guess}."


def encoder_from_state_dict(
    model, state: Mapping, *, quick_gelu=None, strict=True, source="state dict", copy_tensors=False
) -> nn.Module:
    """Build the image tower of ``model`` and assign the tower's tensors from ``state``.

    ``state`` may be the tower's own state dict or that of a wrapper (``visual.*``,
    ``model.visual.*``, ...); the prefix is found by matching the architecture's keys.

    Parameters
    ----------
    model : str or dict
        Architecture name or model config.
    state : mapping of str to torch.Tensor
        The weights.
    quick_gelu : bool or None, default=None
        See :func:`build_open_clip_encoder`.
    strict : bool, default=True
        Refuse keys that are neither the tower's nor known text-tower leftovers.
    source : str, default="state dict"
        Where ``state`` came from, for error messages.
    copy_tensors : bool, default=False
        Copy the tower's tensors instead of assigning them, so that the tower shares no
        storage with ``state``.

    Returns
    -------
    torch.nn.Module
        The tower in eval mode, holding the checkpoint's tensors (copies if ``copy_tensors``).
    """
    encoder = build_open_clip_encoder(model, quick_gelu=quick_gelu, device="meta")
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    prefix = _split_prefix(state, expected)
    visual = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    parent = prefix[: -len("visual.")] if prefix.endswith("visual.") else None

    unexpected = [prefix + k for k in visual if k not in expected]
    ignored = []
    for key in state:
        if key.startswith(prefix):
            continue
        rest = key[len(parent) :] if parent is not None and key.startswith(parent) else None
        if rest is not None and (rest in _TEXT_KEYS or rest.startswith(_TEXT_PREFIXES)):
            ignored.append(key)
        else:
            unexpected.append(key)
    missing = [prefix + k for k in expected if k not in visual]
    mismatched = [
        f"{prefix}{k}: checkpoint {tuple(visual[k].shape)} vs architecture {shape}"
        for k, shape in expected.items()
        if k in visual and tuple(visual[k].shape) != shape
    ]
    if missing or mismatched or (strict and unexpected):
        lines = [f"{source} does not match the open_clip architecture {_architecture_label(model)}:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items and (title != "unexpected" or strict):
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines) + _describe_vit(visual))
    tensors = {k: visual[k].detach().clone() if copy_tensors else visual[k] for k in expected}
    encoder.load_state_dict(tensors, strict=True, assign=True)
    for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]:
        if tensor.is_meta:  # a non-persistent buffer the checkpoint cannot provide
            raise CheckpointError(f"{source}: {name} was not filled from the checkpoint")
    return encoder.eval()


def _detect_quick_gelu(legacy: LegacyObject) -> bool | None:
    """QuickGELU or GELU, read off the activation classes of a pickled image tower."""
    modules = list(legacy_modules(legacy))
    visual = [m for name, m in modules if "visual" in name.split(".")]
    found = None
    for module in visual or [m for _, m in modules]:
        cls = type(module).legacy_class
        if cls.endswith(".QuickGELU"):
            return True
        if cls.endswith(".GELU"):
            found = False
    return found


def checkpoint_state(checkpoint) -> tuple[dict, bool | None, str]:
    """Turn any supported checkpoint into ``(state_dict, detected_quick_gelu, source)``."""
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        checkpoint = read_checkpoint(checkpoint)
    else:
        source = f"the given {type(checkpoint).__name__}"
    if isinstance(checkpoint, LegacyObject):
        try:
            state = legacy_state_dict(checkpoint)
        except TypeError as err:
            raise CheckpointError(f"{source} does not hold a module's weights: {err}") from err
        return state, _detect_quick_gelu(checkpoint), source
    if isinstance(checkpoint, nn.Module):
        quick = None
        for module in checkpoint.modules():
            if isinstance(module, QuickGELU):
                quick = True
                break
            if isinstance(module, nn.GELU):
                quick = False
        return checkpoint.state_dict(), quick, source
    if isinstance(checkpoint, Mapping):
        # A state dict, or one wrapped by a trainer ({"state_dict": {...}, "epoch": ...}).
        return _as_tensor_dict(checkpoint, source), None, source
    raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a state dict or module")


def matching_state(checkpoint, reference: Mapping) -> dict:
    """The tensors of any supported checkpoint under the names of ``reference``'s entries.

    Reads what :func:`load_open_clip_encoder` reads (safetensors and ``torch.save`` files, the
    releases' whole-object pickles, state dicts, modules) and removes a wrapper's key prefix
    (``visual.``, ``model.visual.``, ``module.``...) found by matching the names and shapes of
    ``reference``; entries outside that prefix (a text tower) are left out.

    Parameters
    ----------
    checkpoint : str, os.PathLike, mapping or torch.nn.Module
        The checkpoint.
    reference : mapping of str to torch.Tensor
        The state dict whose names are wanted (e.g. the pretrained encoder's).

    Returns
    -------
    dict of str to torch.Tensor
        Every entry under the prefix, renamed; compare it with ``reference`` for missing or
        unexpected entries.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> wrapped = {"model.visual." + k: v for k, v in lin.state_dict().items()} | {"text.w": torch.ones(1)}
    >>> sorted(matching_state(wrapped, lin.state_dict()))
    ['bias', 'weight']
    """
    state, _, _ = checkpoint_state(checkpoint)
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    whole = _whole_towers(state, expected)
    if len(whole) > 1:  # two towers (a teacher and a student, a model and its EMA): never guess
        raise CheckpointError(
            f"the checkpoint holds the whole tower under several prefixes ({', '.join(repr(p) for p in whole)}): "
            "pick one and pass its state dict, e.g. {k[len(prefix):]: v for k, v in state.items() "
            "if k.startswith(prefix)}"
        )
    prefix = _split_prefix(state, expected)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _whole_towers(state: Mapping, expected: Mapping[str, tuple]) -> list[str]:
    """The key prefixes under which ``state`` holds every expected entry with its shape."""
    found: dict[str, set] = {}
    for prefix, name in _shape_matches(state, expected):
        found.setdefault(prefix, set()).add(name)
    return sorted(p for p, names in found.items() if len(names) == len(expected))


def _shape_matches(state: Mapping, expected: Mapping[str, tuple]):
    """``(prefix, name)`` for every key ``prefix + name`` of ``state`` whose value has ``expected[name]``'s shape."""
    for key, value in state.items():
        parts = key.split(".")
        for i in range(len(parts)):
            rest = ".".join(parts[i:])
            if rest in expected and tuple(getattr(value, "shape", ())) == expected[rest]:
                yield ".".join(parts[:i]) + ("." if i else ""), rest


def load_open_clip_encoder(model, checkpoint, *, quick_gelu=None, strict=True) -> nn.Module:
    """Load the image tower of an open_clip architecture from a checkpoint.

    Parameters
    ----------
    model : str or dict
        Architecture name (``"ViT-B-32"``) or model config, see :func:`open_clip_model_config`.
    checkpoint : str, os.PathLike, mapping or torch.nn.Module
        A ``.safetensors`` / ``torch.save`` state dict (read with ``weights_only=True``),
        a whole-object release pickle (read with the restricted unpickler), an in-memory
        state dict, or a module (an open_clip ``CLIP``, its ``visual``, a release
        ``ImageEncoder``). Keys may be prefixed (``visual.``, ``model.visual.``); the text
        tower's leftovers are ignored.
    quick_gelu : bool or None, default=None
        Activation of the tower. ``None``: as read off a pickled or in-memory module,
        else the config's ``quick_gelu`` entry (false when absent). OpenAI-trained weights
        need ``True`` (or an architecture name ending in ``-quickgelu``).
    strict : bool, default=True
        Refuse keys that are neither the tower's nor text-tower leftovers.

    Returns
    -------
    torch.nn.Module
        Today's open_clip image tower in eval mode. Its tensors are always its own: those of
        an in-memory module or state dict are copied, so changing ``checkpoint`` in place
        afterwards (fine-tuning it, say) leaves the returned tower as it was loaded.

    Raises
    ------
    CheckpointError
        On missing, unexpected or mis-shaped keys; the message lists them and guesses
        the architecture the checkpoint holds.

    Examples
    --------
    >>> import torch
    >>> from momaestimator.checkpoints import build_open_clip_encoder, load_open_clip_encoder
    >>> tiny = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
    ...                                       "layers": 1, "head_width": 8}}
    >>> source = build_open_clip_encoder(tiny)
    >>> state = {f"model.visual.{k}": v for k, v in source.state_dict().items()}
    >>> encoder = load_open_clip_encoder(tiny, state)
    >>> x = torch.randn(1, 3, 16, 16)
    >>> torch.equal(encoder(x), source.eval()(x))
    True
    """
    # A file's tensors are fresh; the caller's own module or state dict must not be aliased.
    in_memory = not isinstance(checkpoint, (str, os.PathLike))
    state, detected, source = checkpoint_state(checkpoint)
    if quick_gelu is None:
        quick_gelu = detected
    return encoder_from_state_dict(
        model, state, quick_gelu=quick_gelu, strict=strict, source=source, copy_tensors=in_memory
    )


def infer_open_clip_config(encoder: nn.Module) -> dict:
    """Recover the model config of an open_clip ``VisionTransformer`` from the module.

    Parameters
    ----------
    encoder : open_clip.transformer.VisionTransformer
        The tower.

    Returns
    -------
    dict
        ``{"embed_dim": ..., "vision_cfg": {...}, "quick_gelu": ...}``, checked to rebuild a
        tower with the same parameter names and shapes.

    Raises
    ------
    ValueError
        If the tower uses options this inference does not cover (attentional pooling,
        ...): pass the architecture explicitly instead.

    Examples
    --------
    >>> from momaestimator.checkpoints import build_open_clip_encoder, infer_open_clip_config
    >>> infer_open_clip_config(build_open_clip_encoder("ViT-B-32", device="meta"))["vision_cfg"]["width"]
    768
    """
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"can only infer the config of an open_clip VisionTransformer, got {type(encoder).__name__}")
    if encoder.attn_pool is not None or encoder.proj is None:
        raise ValueError("this VisionTransformer uses attentional pooling or no projection; pass its config")
    block = encoder.transformer.resblocks[0]
    width, heads = encoder.transformer.width, block.attn.num_heads
    image_size, patch_size = encoder.image_size, encoder.patch_size
    vision_cfg = {
        "image_size": image_size[0] if image_size[0] == image_size[1] else list(image_size),
        "patch_size": patch_size[0] if patch_size[0] == patch_size[1] else list(patch_size),
        "width": width,
        "layers": encoder.transformer.layers,
        "head_width": width // heads,
        "mlp_ratio": block.mlp.c_fc.out_features / width,
    }
    if not isinstance(block.ls_1, nn.Identity):
        vision_cfg["ls_init_value"] = 1e-5  # only makes LayerScale exist; its value is a weight
    if isinstance(encoder.ln_pre, nn.Identity):
        vision_cfg["no_ln_pre"] = True
    if encoder.pool_type != "tok":
        vision_cfg["pool_type"] = encoder.pool_type
    if encoder.final_ln_after_pool:
        vision_cfg["final_ln_after_pool"] = True
    cfg = {
        "embed_dim": encoder.output_dim,
        "vision_cfg": vision_cfg,
        "quick_gelu": isinstance(block.mlp.gelu, QuickGELU),
    }
    rebuilt = build_open_clip_encoder(cfg, device="meta")
    got = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    same_modules = [type(m) for m in encoder.modules()] == [type(m) for m in rebuilt.modules()]
    if got != want or not same_modules:
        raise ValueError("could not infer this VisionTransformer's config; pass the architecture explicitly")
    return cfg
