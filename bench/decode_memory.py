"""Peak memory of a worker's decodes: many threads, large PNGs, one decode budget.

    python bench/decode_memory.py [--threads 32] [--megapixels 49] [--budget-mb 2048]

Each allocator setting runs in a fresh process (arena settings are per process and must
come before threads start): `extract_signals` on `--threads` threads at once, each on a
49-megapixel PNG, through one shared `MemoryBudget`, with a cheap NumPy preprocess (the
model's preprocessing is a small part of the peak, and torch's CLIP processor is not
needed to measure decoding). Reports the peak RSS (VmHWM) of each, printed and written
as JSON to bench/results/decode_memory.json.

Settings: `default` (glibc as it comes), `trim` (malloc_trim when a large reservation
ends), `arenas` (two malloc arenas), `arenas+trim` (what the worker runs with).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SETTINGS = ("default", "trim", "arenas", "arenas+trim")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--megapixels", type=int, default=49)
    parser.add_argument("--budget-mb", type=int, default=2048)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_memory.json"))
    parser.add_argument(
        "--glibc-arenas",
        type=int,
        help="MALLOC_ARENA_MAX for the settings that keep glibc's arenas: glibc's default is "
        "8 per core, so 128 stands for a 16-core worker (default: this machine's).",
    )
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_png(path: Path, megapixels: int) -> None:
    from moderation.demo.synthetic import textured

    side = int((megapixels * 1e6) ** 0.5)
    # Textured, so that PNG's filters leave real work for zlib, as in a photo.
    textured(1, (side, side)).save(path, "PNG", compress_level=1)


def child(setting: str, image: Path, threads: int, budget_mb: int) -> dict[str, object]:
    from PIL import Image

    from moderation.images import memory

    if "arenas" in setting:
        assert memory.configure_allocator()
    from moderation.config import Settings
    from moderation.images.budget import RELEASE_AFTER_BYTES, MemoryBudget
    from moderation.images.decode import DecodeLimits
    from moderation.images.signals import extract_signals

    data = image.read_bytes()
    limits = DecodeLimits.from_settings(Settings())
    budget = MemoryBudget(
        budget_mb * 2**20, release_after_bytes=RELEASE_AFTER_BYTES if "trim" in setting else None
    )

    def preprocess(frame: Image.Image) -> np.ndarray:
        # As the CLIP preprocessing does: Pillow reduces, then resamples.
        return np.asarray(frame.resize((224, 224), Image.Resampling.BICUBIC, reducing_gap=2.0))

    baseline = vm_hwm_mb()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            extract_signals(data, limits, preprocess, budget)
        except BaseException as exc:
            errors.append(exc)

    started = time.perf_counter()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return {
        "setting": setting,
        "peak_rss_mb": round(vm_hwm_mb()),
        "rss_before_decoding_mb": round(baseline),
        "seconds": round(time.perf_counter() - started, 1),
    }


def child_environment(glibc_arenas: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if glibc_arenas is not None:
        # configure_allocator's mallopt overrides it where it runs.
        env["MALLOC_ARENA_MAX"] = str(glibc_arenas)
    return env


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.image, args.threads, args.budget_mb)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "large.png"
        make_png(image, args.megapixels)
        for setting in args.settings:
            # A fresh process per setting: arenas cannot be undone, and peaks only rise.
            out = subprocess.run(
                [
                    *(sys.executable, __file__, "--child", setting, "--image", str(image)),
                    *("--threads", str(args.threads), "--budget-mb", str(args.budget_mb)),
                ],
                check=True,
                capture_output=True,
                text=True,
                env=child_environment(args.glibc_arenas),
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(result))
            results.append(result)
    report = {
        "threads": args.threads,
        "megapixels": args.megapixels,
        "budget_mb": args.budget_mb,
        "glibc_arenas": args.glibc_arenas or "glibc's default, 8 per core",
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
