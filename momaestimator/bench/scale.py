"""Cost of fitting at real scale: ViT-B/32 (and ViT-L/14) open_clip towers with random weights.

Run ``python -m momaestimator.bench.scale`` (``--help`` for options). For T = 2, 4, 8 tasks it
prints, per method: seconds per optimisation step, the peak memory ``fit`` adds beyond the user's
models (CPU: resident set size; GPU: allocator peak), that peak as a multiple of one encoder's
parameter bytes, the ratio peak(T=max)/peak(T=min), and the ratio of a step to one plain
forward + backward of the encoder on the same samples (the floor: the median of a few repeats, as
the step is a median over steps, timed in the same process right after each fit) and to plain
forward + backward passes split as the fit splits its step ("same passes": one per task with
``task_batching="sequential"``), which isolates what the mask and the rotations themselves cost.
On CPU each measurement runs in a fresh subprocess, so that one run's allocations do not hide the
next one's (the resident set only grows); on CUDA they run in one process, with the allocator's
peak reset for each. Weights are random: cost does not depend on training.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

__all__ = ["build_tower", "floor_seconds", "floor_times", "main", "measure"]


def build_tower(model: str, seed: int = 0):
    """The image tower of open_clip architecture ``model`` with seeded random weights."""
    import open_clip
    import torch
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {model!r}")
    torch.manual_seed(seed)
    return _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"])).eval(), cfg


def measure(
    model: str,
    n_tasks: int,
    method: str,
    *,
    batch_size: int,
    n_steps: int,
    device: str,
    precision=None,
    task_batching="joint",
    micro_batch_size=None,
    gradient_checkpointing=False,
    recompute_merged_weights=False,
    cuda_graphs=True,
) -> dict:
    """One measurement (on CPU run it in a fresh process): time ``fit`` and measure its peak memory."""
    import torch

    from ..baselines import AdaMerging
    from ..merger import MOMAMerger
    from ..merging import task_arithmetic
    from ..merging.fit import pass_plan
    from .measure import PeakMemory

    pre, experts, heads, X = _problem(model, n_tasks, batch_size)
    # the user's pretrained encoder lives on the fit device (a GPU user's model is on the GPU), so
    # "extra" memory is what fitting adds beyond it; the experts stay on the CPU
    pre = copy.deepcopy(pre).to(device)
    n_params = sum(p.numel() for p in pre.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in pre.parameters())
    out = {
        "model": model,
        "n_tasks": n_tasks,
        "method": method,
        "batch_per_task": batch_size,
        "encoder_params": n_params,
        "device": device,
        "gradient_checkpointing": bool(gradient_checkpointing) and method == "moma",
        "recompute_merged_weights": bool(recompute_merged_weights) and method == "moma",
    }

    mem_device = "cpu" if method == "task_arithmetic" else device  # Task Arithmetic is CPU work
    out["memory"] = "CUDA allocated" if mem_device.startswith("cuda") else "RSS"
    with PeakMemory(mem_device) as mem:
        if method == "task_arithmetic":
            task_arithmetic({k: v.cpu() for k, v in pre.state_dict().items()}, experts, scaling=0.3)
        elif method == "adamerging_layerwise":
            est = AdaMerging(
                pre,
                experts,
                heads,
                granularity="layer",
                n_steps=n_steps,
                batch_size=batch_size,
                device=device,
                random_state=0,
            ).fit(X)
        else:
            est = MOMAMerger(
                pre,
                experts,
                heads,
                sparsity=0.1,
                n_steps=n_steps,
                batch_size=batch_size,
                validation_fraction=0.0,
                precision=precision,
                task_batching=task_batching,
                micro_batch_size=micro_batch_size,
                gradient_checkpointing=gradient_checkpointing,
                recompute_merged_weights=recompute_merged_weights,
                cuda_graphs=cuda_graphs,
                device=device,
                random_state=0,
            ).fit(X)
    out["fit_seconds"] = mem.seconds
    out["peak_extra_mb"] = mem.peak_mb
    out["peak_over_param_bytes"] = mem.peak_mb * 2**20 / param_bytes
    if hasattr(mem, "peak_reserved_mb"):  # CUDA: what the caching allocator (and graph pools) held
        out["peak_reserved_mb"] = mem.peak_reserved_mb
    if method != "task_arithmetic":
        sec = [h["seconds"] for h in est.history_]
        out["seconds_per_step"] = statistics.median(b - a for a, b in zip(sec, sec[1:])) if len(sec) > 1 else sec[0]
        # the floor, paired: measured in the same process right after the fit, on the same samples
        x = torch.cat([X[t][:batch_size] for t in X]).to(device)
        # the median of the repeats, like the step (a median over steps): the same statistic on both
        # sides of the ratio (the fastest repeat, also kept, would bias it up on a noisy machine)
        times = floor_times(pre, x, repeats=max(3, n_steps), precision=precision)
        out["floor_seconds"], out["floor_min_seconds"] = statistics.median(times), min(times)
        out["step_over_floor"] = out["seconds_per_step"] / out["floor_seconds"]
        # the same passes as the fit (one per task group): what MOMA's own work costs on top
        passes = (
            pass_plan([batch_size] * len(X), task_batching, micro_batch_size)
            if method == "moma"
            else [[(i, 0, batch_size) for i in range(len(X))]]
        )
        if len(passes) > 1:
            sizes = [sum(hi - lo for _, lo, hi in p) for p in passes]
            out["pass_floor_seconds"] = floor_seconds(
                pre, x, repeats=max(3, n_steps), precision=precision, passes=sizes
            )
        else:
            out["pass_floor_seconds"] = out["floor_seconds"]
        out["step_over_pass_floor"] = out["seconds_per_step"] / out["pass_floor_seconds"]
    return out


def floor_seconds(encoder, x, *, repeats=3, precision=None, passes=None) -> float:
    """Median of ``repeats`` plain forward + backward passes of ``encoder`` on the batch ``x``
    (see :func:`floor_times`).
    """
    return statistics.median(floor_times(encoder, x, repeats=repeats, precision=precision, passes=passes))


def floor_times(encoder, x, *, repeats=3, precision=None, passes=None) -> list[float]:
    """Seconds of each of ``repeats`` plain forward + backward passes of ``encoder`` on the batch ``x``
    (after one warm-up pass).

    ``passes`` (sample counts summing to ``len(x)``) splits the batch into that many forward +
    backward passes, their gradients accumulating, as a fit with several passes per step does.
    """
    import torch

    enc = copy.deepcopy(encoder).train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    chunks = torch.split(x, list(passes)) if passes else (x,)
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        t0 = time.perf_counter()
        for chunk in chunks:
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                out = enc(chunk)
            out.float().square().mean().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


@functools.lru_cache(maxsize=1)
def _problem(model: str, n_tasks: int, batch_size: int):
    """Pretrained tower, experts (pretrained + small random task vectors), heads and inputs, on the CPU."""
    import torch

    from ..models import LinearHead

    pre, cfg = build_tower(model)
    size = cfg["vision_cfg"]["image_size"]
    dim = cfg["embed_dim"]
    gen = torch.Generator().manual_seed(1)
    experts, heads, X = {}, {}, {}
    for t in range(n_tasks):
        expert = copy.deepcopy(pre)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=gen).mul_(1e-3))
        experts[f"t{t}"] = expert
        heads[f"t{t}"] = LinearHead(torch.randn(10, dim, generator=gen))
        X[f"t{t}"] = torch.randn(2 * batch_size, 3, size, size, generator=gen)
    return pre, experts, heads, X


def _run_in_process(kw) -> dict:
    """One measurement in this process (CUDA: the allocator's peak is reset per measurement)."""
    import torch

    try:
        return measure(**kw)
    except Exception as exc:  # noqa: BLE001 - one failed row must not stop the table
        return {"error": [f"{type(exc).__name__}: {exc}"]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_child(args_list) -> dict:
    cmd = [sys.executable, "-m", "momaestimator.bench.scale", "--child", json.dumps(args_list)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    """Entry point: print the scale table (and write it as JSON with ``--out``)."""
    p = argparse.ArgumentParser(prog="python -m momaestimator.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    p.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8], help="numbers of tasks (default 2 4 8)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["moma", "task_arithmetic", "adamerging_layerwise"],
        help="moma, task_arithmetic, adamerging_layerwise",
    )
    p.add_argument("--batch-size", type=int, default=4, help="samples per task per step (default 4)")
    p.add_argument("--n-steps", type=int, default=3, help="steps timed per fit (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="autocast of the encoder's forward (default: fp32, none)",
    )
    p.add_argument(
        "--task-batching",
        nargs="+",
        default=["sequential", "joint"],
        help="MOMAMerger task_batching values: joint, sequential or tasks per pass (default: sequential joint)",
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="MOMAMerger micro_batch_size: most samples per forward/backward pass (default: no cut)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        nargs="+",
        default=["off"],
        choices=["on", "off"],
        help="MOMAMerger gradient_checkpointing values to measure (default: off); 'on' rows are labelled 'ckpt' "
        "(the floors never checkpoint: the recomputation counts in the ratios)",
    )
    p.add_argument(
        "--recompute-merged-weights",
        nargs="+",
        default=["off"],
        choices=["on", "off"],
        help="MOMAMerger recompute_merged_weights values to measure (default: off); 'on' rows are labelled 'remerge'",
    )
    p.add_argument(
        "--cuda-graphs",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="MOMAMerger cuda_graphs values to measure on CUDA (default: on); 'off' rows are labelled 'eager'",
    )
    p.add_argument("--large", default=None, help="also run this architecture at the smallest T (e.g. ViT-L-14)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure every row in this process (default on CUDA, whose allocator peak can be reset; "
        "on CPU the resident set only grows, so each row gets a fresh process unless this is given)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision == "fp32":
        args.precision = None  # no autocast
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        kw = json.loads(args.child)
        print(json.dumps(measure(**kw)))
        return 0
    run = _run_in_process if (args.in_process or args.device.startswith("cuda")) else _run_child
    rows = []
    variants = []  # (label, method, task_batching, cuda_graphs, gradient_checkpointing, recompute_merged_weights)
    graph_modes = args.cuda_graphs if args.device.startswith("cuda") else ["on"]
    for method in args.methods:
        if method == "moma":
            for tb in args.task_batching:
                tb = int(tb) if tb.isdigit() else tb
                for ckpt, remerge, mode in itertools.product(
                    args.gradient_checkpointing, args.recompute_merged_weights, graph_modes
                ):
                    suffix = f",mb{args.micro_batch_size}" if args.micro_batch_size else ""
                    suffix += ",ckpt" if ckpt == "on" else ""
                    suffix += ",remerge" if remerge == "on" else ""
                    suffix += (f",{args.precision}" if args.precision else "") + (",eager" if mode == "off" else "")
                    variants.append((f"moma[{tb}{suffix}]", "moma", tb, mode == "on", ckpt == "on", remerge == "on"))
        else:
            variants.append((method, method, None, True, False, False))
    plan = [(args.model, t) for t in args.tasks] + ([(args.large, min(args.tasks))] if args.large else [])
    for model, t in plan:
        for label, method, batching, graphs, ckpt, remerge in variants:
            r = (_run_child if method == "task_arithmetic" else run)(
                {
                    "model": model,
                    "n_tasks": t,
                    "method": method,
                    "batch_size": args.batch_size,
                    "n_steps": args.n_steps,
                    "device": args.device,
                    "precision": args.precision,
                    "task_batching": batching,
                    "micro_batch_size": args.micro_batch_size if method == "moma" else None,
                    "gradient_checkpointing": ckpt,
                    "recompute_merged_weights": remerge,
                    "cuda_graphs": graphs,
                }
            )
            r.update(model=model, n_tasks=t, method=label)
            rows.append(r)
            print(_fmt(r), flush=True)
    if len(set(args.tasks)) > 1:
        print(
            f"targets: peak(T={max(args.tasks)})/peak(T={min(args.tasks)}) <= 1.25, "
            "peak <= 8x encoder bytes, step <= 1.5x floor"
        )
    for label, *_ in variants:
        mine = [r for r in rows if r["method"] == label and r["model"] == args.model and r.get("peak_extra_mb")]
        if len(mine) >= 2:
            lo = min(mine, key=lambda r: r["n_tasks"])
            hi = max(mine, key=lambda r: r["n_tasks"])
            ratio = hi["peak_extra_mb"] / lo["peak_extra_mb"]
            line = f"{label}: peak(T={hi['n_tasks']}) / peak(T={lo['n_tasks']}) = {ratio:.2f}"
            line += f"; at T={hi['n_tasks']}: {hi['peak_over_param_bytes']:.1f}x encoder bytes"
            if "step_over_floor" in hi:
                line += f", {hi['step_over_floor']:.2f}x floor"
            if "step_over_pass_floor" in hi:
                line += f" ({hi['step_over_pass_floor']:.2f}x the same passes"
                line += f"; {hi['seconds_per_step'] / hi['floor_min_seconds']:.2f}x the fastest floor repeat)"
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _fmt(r):
    if "error" in r:
        return f"{r['model']:<9} T={r['n_tasks']:<2} {r['method']:<22} ERROR {r['error']}"
    step = f"{r['seconds_per_step']:.3f} s/step" if "seconds_per_step" in r else "      -     "
    ratio = f" ({r['step_over_floor']:.2f}× floor" if "step_over_floor" in r else ""
    if ratio:
        ratio += f", {r['step_over_pass_floor']:.2f}× same passes)" if "step_over_pass_floor" in r else ")"
    mem = (
        f"peak +{r['peak_extra_mb']:8.0f} MB = {r['peak_over_param_bytes']:.1f}× encoder bytes"
        if "peak_extra_mb" in r
        else ""
    )
    if "peak_reserved_mb" in r:
        mem += f", reserved +{r['peak_reserved_mb']:.0f} MB"
    return f"{r['model']:<9} T={r['n_tasks']:<2} {r['method']:<22} {step}{ratio}  {mem} ({r.get('memory', '')})"


if __name__ == "__main__":
    sys.exit(main())
