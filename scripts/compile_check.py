"""Does ``torch.compile`` speed up the encoder's forward + backward? Compile seconds and pass seconds.

Usage: ``python scripts/compile_check.py [device] [batch ...]`` (default: cuda, batches 16 and 128).
Prints, per batch size, the fastest of 5 eager passes of a ViT-B/32 open_clip tower (random
weights), the seconds of the first compiled call (compilation included) and the fastest of 5
compiled passes; a fit of ``n`` steps gains only if ``n × (eager - compiled)`` exceeds the
compile seconds.
"""

import functools
import sys
import time

import torch

from momaestimator.bench.scale import build_tower


def _timed(fn, device, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv):
    device = argv[0] if argv else "cuda"
    batches = [int(b) for b in argv[1:]] or [16, 128]
    enc, cfg = build_tower("ViT-B-32")
    enc = enc.to(device).train()
    size = cfg["vision_cfg"]["image_size"]
    print(f"torch {torch.__version__}, device {device}")
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)

        def one_pass(model, x=x):
            model(x).float().square().mean().backward()

        _timed(lambda: one_pass(enc), device, repeats=2)  # warm-up
        eager = _timed(lambda: one_pass(enc), device)
        torch._dynamo.reset()
        compiled = torch.compile(enc, dynamic=False)
        run_compiled = functools.partial(one_pass, compiled)
        first = _timed(run_compiled, device, repeats=1)
        fast = _timed(run_compiled, device)
        verdict = f"break-even after {first / (eager - fast):.0f} passes" if fast < eager else "slower"
        print(
            f"batch {batch:4d}: eager {eager * 1e3:8.1f} ms/pass | compiled: first call {first:6.1f} s, "
            f"then {fast * 1e3:8.1f} ms/pass ({eager / fast:.2f}x); {verdict}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
