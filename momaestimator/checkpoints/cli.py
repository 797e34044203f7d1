r"""``momaestimator merge``: merge a released checkpoint folder with MOMA from the command line.

Example::

    momaestimator merge --release task_vectors --root ~/checkpoints --model ViT-B-32 \
        --data ~/unlabeled --out merged-vit-b-32

loads the release, reads a few unlabeled images per task, fits :class:`MOMAMerger`, prints
how often the merged model agrees with each fine-tuned expert on those images, and writes
the merged model with :func:`~momaestimator.checkpoints.save_merged_model`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from momaestimator.checkpoints.errors import CheckpointError
from momaestimator.checkpoints.files import atomic_write
from momaestimator.checkpoints.merged import save_merged_model
from momaestimator.checkpoints.openclip import open_clip_model_config
from momaestimator.checkpoints.releases import (
    TALL_MASKS_TASKS,
    TASK_VECTORS_TASKS,
    canonical_task_name,
    load_tall_masks_release,
    load_task_vectors_release,
    release_task_names,
)

__all__ = ["main"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_RELEASES = {"task_vectors": load_task_vectors_release, "tall_masks": load_tall_masks_release}


class _CommandError(Exception):
    """A problem with the command's input, reported as ``momaestimator: error: ...`` (exit status 2)."""


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _number(kind, low=None, high=None, *, high_open=False):
    """An argparse ``type`` reading an int or a float within ``[low, high]`` (``high`` excluded if ``high_open``)."""
    if high is None:
        interval = f">= {low}"
    else:
        interval = f"in [{low}, {high}{')' if high_open else ']'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} {interval}, got {text!r}"
            ) from None
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or (low is not None and value < low) or too_high:
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="momaestimator",
        description="MOMA model merging for CLIP image encoders.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge = commands.add_parser(
        "merge",
        help="merge a released checkpoint folder with MOMA, given unlabeled data per task",
        description=(
            "Load the pretrained and fine-tuned encoders and heads of a checkpoint release, fit MOMA's "
            "global mask and per-task rotations on unlabeled images, print how often the merged model "
            "agrees with each fine-tuned expert on them, and save the merged model "
            "(model.safetensors + model.json) in --out."
        ),
        epilog=(
            "example: momaestimator merge --release task_vectors --root checkpoints --model ViT-B-32 "
            "--data unlabeled/ --out merged/ --n-steps 200 --device cuda"
        ),
    )
    merge.add_argument(
        "--release",
        required=True,
        choices=sorted(_RELEASES),
        help="layout of --root: task_vectors (<M>/zeroshot.pt, <M>/<Task>/finetuned.pt, "
        "<M>/head_<Task>.pt) or tall_masks (<M>/<Task>Val/nonlinear_finetuned.pt, nonlinear_zeroshot.pt, "
        "<M>/head_<Task>Val.pt)",
    )
    merge.add_argument(
        "--root",
        required=True,
        type=_path,
        metavar="DIR",
        help="folder holding one sub-folder per architecture",
    )
    merge.add_argument(
        "--model",
        default="ViT-B-32",
        metavar="NAME",
        help="architecture: the sub-folder of --root and the open_clip model name (default: %(default)s)",
    )
    merge.add_argument(
        "--model-config",
        type=_path,
        default=None,
        metavar="JSON",
        help="JSON open_clip model config (embed_dim, vision_cfg, optionally quick_gelu) for an architecture "
        "open_clip does not name",
    )
    merge.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="tasks to merge, case-insensitive with aliases (e.g. stanford_cars); for tall_masks also "
        "8, 14 or 20. Default: the release's 8 tasks",
    )
    merge.add_argument(
        "--data",
        required=True,
        type=_path,
        metavar="DIR_OR_NPZ",
        help="unlabeled data: a folder with one image sub-folder per task (<data>/<Task>/*.png|jpg, "
        "resized and normalised with the architecture's open_clip transform), or an .npz with one "
        "float array (n, 3, H, W) per task, already preprocessed",
    )
    merge.add_argument("--out", required=True, type=_path, metavar="DIR", help="output folder for the merged model")
    merge.add_argument(
        "--max-per-task",
        type=_number(int, 1),
        default=None,
        metavar="N",
        help="use at most N samples per task (default: all)",
    )
    merge.add_argument(
        "--sparsity",
        type=_number(float, 0.0, 1.0, high_open=True),
        default=0.1,
        metavar="F",
        help="fraction of the multi-task vector the mask removes, in [0, 1) (default: %(default)s)",
    )
    merge.add_argument(
        "--n-steps", type=_number(int, 0), default=100, metavar="N", help="optimisation steps (default: %(default)s)"
    )
    merge.add_argument(
        "--batch-size",
        type=_number(int, 1),
        default=16,
        metavar="N",
        help="samples per task per step (default: %(default)s)",
    )
    merge.add_argument(
        "--device",
        default="cpu",
        help="torch device for fitting and evaluation, e.g. cuda (default: %(default)s)",
    )
    merge.add_argument(
        "--seed",
        type=_number(int, 0, 2**32 - 1),
        default=0,
        metavar="N",
        help="random seed; same seed, same CPU result (default: %(default)s)",
    )
    merge.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    return parser


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _task_for(name: str, tasks: list[str]) -> str | None:
    canonical = canonical_task_name(name)
    for task in tasks:
        if task == name or (canonical is not None and task == canonical) or task.lower() == name.lower():
            return task
    return None


def _load_npz(path: Path, tasks: list[str]) -> dict[str, torch.Tensor]:
    data = {}
    try:
        with np.load(path, allow_pickle=False) as arrays:
            for name in arrays.files:
                task = _task_for(name, tasks)
                if task is None:
                    continue
                array = arrays[name]
                if array.ndim != 4 or array.shape[1] != 3 or not np.issubdtype(array.dtype, np.floating):
                    raise _CommandError(
                        f"{path}: array {name!r} must be float (n, 3, H, W), got {array.dtype} {array.shape}"
                    )
                data[task] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise _CommandError(f"--data {path}: cannot read it as an .npz file of float arrays ({err})") from err
    return data


def _image_files(path: Path, tasks: list[str], max_per_task) -> dict[str, list[Path]]:
    """The image files of each task's sub-folder of ``path`` (at most ``max_per_task`` each)."""
    files = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        task = _task_for(folder.name, tasks)
        if task is None:
            continue
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_per_task]
        if not found:
            raise _CommandError(f"{folder}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        files[task] = found
    return files


def _open_images(files: list[Path], convert):
    """``convert(image)`` for each file, or an error naming the file that cannot be read."""
    from PIL import Image

    out = []
    for file in files:
        try:
            with Image.open(file) as image:
                out.append(convert(image))
        except OSError as err:  # PIL.UnidentifiedImageError included
            raise _CommandError(f"{file}: cannot read the image ({err})") from err
    return out


def _load_image_folder(files: dict[str, list[Path]], image_size) -> dict[str, torch.Tensor]:
    import open_clip

    transform = open_clip.image_transform(image_size, is_train=False)
    return {t: torch.stack(_open_images(f, lambda image: transform(image.convert("RGB")))) for t, f in files.items()}


def _typo_hint(names: list[str]) -> str:
    """``; 'MINST' is not a task of the releases (did you mean 'MNIST'?)`` for unknown names, else ``""``."""
    import difflib

    known = list(dict.fromkeys((*TASK_VECTORS_TASKS, *TALL_MASKS_TASKS)))
    hints = []
    for name in names:
        if canonical_task_name(name) is None:
            close = difflib.get_close_matches(name.upper(), [k.upper() for k in known], n=1, cutoff=0.6)
            guess = next((k for k in known if close and k.upper() == close[0]), None)
            hints.append(f"{name!r} is not a task of the releases" + (f" (did you mean {guess!r}?)" if guess else ""))
    return "; " + "; ".join(hints) if hints else ""


def _precheck_data(args, tasks: list[str]) -> dict[str, torch.Tensor] | dict[str, list[Path]]:
    """Read (an .npz) or check (an image folder) ``--data`` before any checkpoint is loaded.

    Returns the arrays of an .npz (read once), or each task's image files, every one of which has
    been opened here (they are decoded after loading, at the model's image size).
    """
    if args.data.suffix == ".npz":
        data = _load_npz(args.data, tasks)
        if args.max_per_task is not None:
            data = {t: x[: args.max_per_task] for t, x in data.items()}
    else:
        data = _image_files(args.data, tasks, args.max_per_task)
        for files in data.values():
            _open_images(files, lambda image: image.verify())
    missing = [t for t in tasks if t not in data]
    if missing:
        raise _CommandError(
            f"--data {args.data} has no samples for tasks {missing}; it must cover {tasks}{_typo_hint(missing)}"
        )
    return {t: data[t] for t in tasks}


def _on(module, device):
    """``module`` on ``device``: itself when already there, else a copy (the merger still uses it)."""
    param = next(module.parameters(), None)
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:  # "cuda" is the current CUDA device: compare indices
        target = torch.device("cuda", torch.cuda.current_device())
    if param is None or param.device == target:
        return module
    return copy.deepcopy(module).to(target)


def _floating_dtype(module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def _predict(encoder, head, x: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    encoder, head = _on(encoder, device).eval(), _on(head, device).eval()
    # Images are float32; a release saved in half precision needs them in its dtype.
    dtype = _floating_dtype(encoder)
    preds = [
        head(encoder(batch.to(device=device, dtype=dtype))).argmax(-1).cpu() for batch in x.split(max(batch_size, 1))
    ]
    return torch.cat(preds)


def _table(rows: list[dict]) -> str:
    header = f"{'task':<16} {'n':>6} {'merged':>8} {'zero-shot':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['task']:<16} {row['n']:>6} {row['merged']:>8.1%} {row['zero_shot']:>10.1%}")
    mean_merged = np.mean([r["merged"] for r in rows])
    mean_zero = np.mean([r["zero_shot"] for r in rows])
    lines += ["-" * len(header), f"{'mean':<16} {'':>6} {mean_merged:>8.1%} {mean_zero:>10.1%}"]
    return "\n".join(lines)


def _read_model_config(args) -> dict | None:
    """The --model-config JSON, or ``None`` when --model is an open_clip name; checked either way."""
    if args.model_config is None:
        try:
            open_clip_model_config(args.model)
        except ValueError as err:
            raise _CommandError(
                f"--model {args.model}: {err}; for an architecture open_clip does not name, pass its config "
                "with --model-config"
            ) from None
        return None
    try:
        cfg = json.loads(args.model_config.read_text(encoding="utf-8"))
    except OSError as err:
        raise _CommandError(f"--model-config {args.model_config}: cannot read it ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _CommandError(f"--model-config {args.model_config} is not valid JSON: {err}") from None
    try:
        open_clip_model_config(cfg)
    except (TypeError, ValueError) as err:
        raise _CommandError(f"--model-config {args.model_config}: {err}") from None
    return cfg


def _check_device(text: str) -> None:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise _CommandError(f"--device {text!r} is not a torch device ({err})") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise _CommandError(f"--device {text}: no CUDA GPU is available here")
        if device.index is not None and device.index >= count:
            available = ", ".join(f"cuda:{i}" for i in range(count))
            raise _CommandError(f"--device {text}: there is no such GPU; available: {available}")
        return
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise _CommandError(f"--device {text}: not usable here ({err})") from None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise _CommandError(f"--out {out} exists and is not a folder")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise _CommandError(f"--out {out}: {parent} is a file, not a folder")


def _check_inputs(args):
    """Check everything that can be checked before loading a checkpoint, the data included.

    Returns ``(model_cfg, tasks as given, the release's task names, the data or its image files)``.
    """
    model_cfg = _read_model_config(args)
    tasks = args.tasks
    if tasks is not None and len(tasks) == 1 and tasks[0].isdigit():
        tasks = int(tasks[0])
        if args.release != "tall_masks":
            raise _CommandError(
                f"--tasks {tasks}: a number of tasks (8, 14 or 20) is for --release tall_masks; "
                f"name the tasks for --release {args.release}"
            )
    if not (args.data.is_dir() or args.data.is_file()):
        raise _CommandError(f"--data {args.data} does not exist")
    if args.data.is_file() and args.data.suffix != ".npz":
        raise _CommandError(f"--data {args.data}: expected an image folder or an .npz file")
    _check_out(args.out)
    _check_device(args.device)
    try:
        names = release_task_names(args.release, tasks)
    except ValueError as err:
        raise _CommandError(str(err)) from err
    return model_cfg, tasks, names, _precheck_data(args, names)


def _merge(args) -> int:
    from momaestimator.merger import MOMAMerger

    model_cfg, tasks, expected, data = _check_inputs(args)
    start = time.perf_counter()
    _log(args, f"loading the {args.release} release from {args.root / args.model} ...")
    try:
        pretrained, finetuned, heads = _RELEASES[args.release](args.root, args.model, tasks, model_cfg=model_cfg)
    except (OSError, ValueError) as err:
        # Missing, unreadable or mismatched checkpoints and bad task names (CheckpointError is a ValueError).
        raise _CommandError(str(err)) from err
    names = list(finetuned)
    _log(args, f"loaded {len(names)} tasks ({', '.join(names)}) in {time.perf_counter() - start:.1f} s")

    if names != expected:  # the loader resolves names as release_task_names does
        raise _CommandError(f"the release loaded tasks {names}, expected {expected}")
    if args.data.suffix != ".npz":  # the checked image files, decoded at the model's image size
        data = _load_image_folder(data, getattr(pretrained, "image_size", 224))
    _log(args, "data: " + ", ".join(f"{t} {tuple(x.shape)}" for t, x in data.items()))

    # The experts' predictions are the reference: the data is unlabeled.
    expert = {t: _predict(finetuned[t], heads[t], data[t], args.device, args.batch_size) for t in names}
    zero_shot = {t: _predict(pretrained, heads[t], data[t], args.device, args.batch_size) for t in names}

    merger = MOMAMerger(
        pretrained,
        finetuned,
        heads,
        sparsity=args.sparsity,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        device=args.device,
        random_state=args.seed,
        verbose=0 if args.quiet else 1,
    )
    merger.fit(data)
    merged = merger.transform()
    rows = []
    for t in names:
        pred = _predict(merged.encoder, merged.heads[t], data[t], args.device, args.batch_size)
        rows.append(
            {
                "task": t,
                "n": len(data[t]),
                "merged": float((pred == expert[t]).float().mean()),
                "zero_shot": float((zero_shot[t] == expert[t]).float().mean()),
            }
        )
    print("agreement with each task's fine-tuned expert on the given data")
    print(_table(rows))

    architecture = model_cfg if model_cfg is not None else args.model
    try:
        save_merged_model(merged, args.out, architecture=architecture)
    except OSError as err:
        raise _CommandError(f"--out {args.out}: cannot write the merged model ({err})") from err
    summary = {
        "release": args.release,
        "model": args.model,
        "tasks": names,
        "params": {k: v for k, v in merger.get_params(deep=False).items() if isinstance(v, (int, float, str))},
        "agreement": rows,
    }
    try:
        atomic_write(args.out / "merge_report.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    except OSError as err:
        raise _CommandError(f"--out {args.out}: cannot write merge_report.json ({err})") from err
    _log(args, f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    """Run the ``momaestimator`` command.

    Parameters
    ----------
    argv : list of str or None, default=None
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    int
        Exit status.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            return _merge(args)
    except (_CommandError, FileNotFoundError, CheckpointError) as err:
        # Bad arguments, missing or unreadable checkpoints and data are the user's to fix:
        # a message, not a traceback.
        parser.exit(2, f"momaestimator: error: {err}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
