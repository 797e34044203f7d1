"""``moma-bench`` / ``python -m momaestimator.bench``: build the zoo (cached) and print the table."""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]


def _int_at_least(low):
    """An argparse type: an integer ``>= low`` (a seed: below 2**32, as NumPy's)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or value >= 2**32:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, 2**32), got {value}")
        return value

    return parse


def _parser():
    from .datasets import EXTRA_TASKS, TASKS
    from .methods import METHODS

    p = argparse.ArgumentParser(
        prog="moma-bench",
        description="Offline real-image benchmark of model merging methods (MOMA and baselines) on a zoo of "
        "small open_clip ViT experts built from images that ship in packages. Builds the zoo once (cached).",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=list(TASKS + EXTRA_TASKS),
        metavar="TASK",
        help=f"tasks to merge (default: all 8 of the zoo): {', '.join(TASKS + EXTRA_TASKS)}",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=_int_at_least(0),
        default=[0],
        help="seeds of the fit-data sample and of each method (default: 0); the table shows mean ± std",
    )
    p.add_argument(
        "--samples-per-class",
        type=_int_at_least(1),
        default=5,
        help="unlabeled fit images per class from each task's train split (default: 5)",
    )
    p.add_argument(
        "--transductive",
        action="store_true",
        help="fit on the unlabeled test inputs instead (AdaMerging/Surgery protocol)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        metavar="METHOD",
        help=f"methods to run (default: all): {', '.join(METHODS)}",
    )
    p.add_argument(
        "--n-steps",
        type=_int_at_least(0),
        default=None,
        help="optimisation steps of every learned method (default: 200; 60 with --quick)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--out", default="bench-out", help="output folder for report.md/json and plots (default: bench-out)")
    p.add_argument("--cache-dir", default=None, help="zoo cache (default: $MOMA_CACHE or ~/.cache/momaestimator)")
    p.add_argument("--zoo-seed", type=_int_at_least(0), default=0, help="seed of the zoo build (default: 0)")
    p.add_argument("--quick", action="store_true", help="a reduced zoo and budget for CI (a few minutes)")
    p.add_argument("--no-analysis", action="store_true", help="skip the misalignment analysis")
    return p


def main(argv=None) -> int:
    """Entry point of ``moma-bench``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct (got {args.seeds}): a repeated seed repeats the same run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .._validation import resolve_device

    try:  # before the zoo is built (minutes)
        resolve_device(args.device)
    except (TypeError, ValueError) as err:
        parser.error(f"--device: {err}")

    from .report import format_regime, format_table, write_report
    from .run import run_benchmark
    from .zoo import ZooConfig, build_zoo, quick_config

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    t0 = time.perf_counter()
    config = quick_config() if args.quick else ZooConfig()
    tasks = args.tasks
    if args.quick and tasks is None:
        tasks = ["mnist", "digits", "fashion_a", "textures"]
    zoo = build_zoo(tasks, seed=args.zoo_seed, config=config, cache_dir=args.cache_dir, verbose=True)
    t_zoo = time.perf_counter() - t0
    print(f"zoo ready in {t_zoo:.1f} s ({len(zoo.tasks)} tasks)")
    n_steps = args.n_steps if args.n_steps is not None else (60 if args.quick else 200)
    report = run_benchmark(
        zoo,
        methods=args.methods,
        seeds=tuple(args.seeds),
        samples_per_class=args.samples_per_class,
        transductive=args.transductive,
        n_steps=n_steps,
        device=args.device,
        analysis=not args.no_analysis,
    )
    report["protocol"]["wall_seconds"] = {"zoo": t_zoo, "total": time.perf_counter() - t0}
    print()
    print(format_regime(report))
    print(f"fit data: {report['protocol']['fit_data']}; seeds {report['protocol']['seeds']}")
    print(format_table(report))
    paths = write_report(report, args.out)
    print(f"\nwall time {time.perf_counter() - t0:.1f} s; wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
