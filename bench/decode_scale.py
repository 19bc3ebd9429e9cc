"""Reduced-scale JPEG decoding: what it does to PDQ, to matching, and to the cost of intake.

    python bench/decode_scale.py [--photos 10] [--synthetic 2] [--repeats 7]

The held-out set is `tests/photos.py`: real photographs rendered as phone JPEGs at
4032x3024 (one per source photo, then closer crops in portrait, the first of those stored
sideways with an EXIF orientation, as phones store them), and the project's synthetic
scenes at the same size (about 1.5 minutes on two busy cores by default). For each
candidate `decode_min_side` (336: the CLIP input of the production model, which makes a
12-megapixel photo decode at 1/8; 512: 1/4; 1024: 1/2), it measures:

- PDQ drift: the Hamming distance between our PDQ of the reduced decode and the reference
  (`pdqhash` on the full-resolution image), per photo: mean, p95, max; beside it, for
  scale, the drift of Meta's C++ file hasher, which resizes anything over 512 pixels to
  512x512 before hashing (emulated with Pillow's nearest-neighbour resize);
- hits: near-duplicates of each photo (re-encoded, resized, cropped, a PNG screenshot) and
  unrelated pairs, at the match threshold (31): distances with both sides decoded the
  same way (screening and bank-add share `extract_signals`), and with the bank side
  hashed at full resolution (a hash list imported from elsewhere), against full
  resolution on both sides; any pair that changes sides of the threshold is counted;
  and with the bank side at full resolution and the worker's fallback
  (`pdq_full_resolution_margin`, `--margin`): an upload whose reduced hash comes within
  the margin beyond the threshold is hashed again at full resolution, so the pair is
  decided by the smaller distance; how many pairs, related or not, would be re-hashed;
- the CLIP crop: mean absolute difference (0-255) of the production model's 336-pixel
  crop against the one made from the full-resolution frame;
- cost: decoding, PDQ and CLIP preprocessing on one core (one torch thread, as an intake
  process runs), the fastest of `--repeats`, at 4032x3024 and at 640x480 (which no
  setting reduces).

Printed, and written as JSON to bench/results/decode_scale.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

# The held-out photos live with the tests, which are not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIN_SIDES = (336, 512, 1024)
THRESHOLD = 31


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--photos", type=int, default=10, help="Real photos: 7 landscape, then portrait ones."
    )
    parser.add_argument("--synthetic", type=int, default=2, help="Synthetic scenes.")
    parser.add_argument("--repeats", type=int, default=7, help="Timing repeats (fastest kept).")
    parser.add_argument("--margin", type=int, default=16, help="pdq_full_resolution_margin.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_scale.json"))
    return parser.parse_args()


@dataclass(frozen=True)
class Photo:
    label: str
    jpeg: bytes


def held_out(photos: int, synthetic: int) -> list[Photo]:
    from PIL import ExifTags, Image

    from tests.images import encode
    from tests.photos import PHONE, PHOTOS, phone_photo, synthetic_scene

    portrait = (PHONE[1], PHONE[0])
    made = []
    for index in range(photos):
        name = PHOTOS[index % len(PHOTOS)]
        second = index >= len(PHOTOS)
        # Second pass: a closer crop, in portrait, the first of them stored sideways.
        image = phone_photo(name, portrait, zoom=0.7, seed=index) if second else phone_photo(name)
        if second and index == len(PHOTOS):
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = 6  # shown turned 90 degrees clockwise
            stored = image.transpose(Image.Transpose.ROTATE_90)
            made.append(Photo(f"{name}-portrait-exif6", encode(stored, quality=90, exif=exif)))
        else:
            # Numbered: past 14 photos the closer crops repeat source photos.
            label = f"{name}-portrait-zoom-{index}" if second else name
            made.append(Photo(label, encode(image, quality=90)))
    for seed in range(synthetic):
        made.append(Photo(f"synthetic-{seed}", encode(synthetic_scene(100 + seed), quality=90)))
    return made


def near_duplicates(upright: Any) -> dict[str, bytes]:
    """What reposts do to a photo: the platform re-encodes, resizes, crops, screenshots."""
    from PIL import Image

    from tests.images import encode

    width, height = upright.size

    def resized(factor: float) -> Any:
        size = (round(width * factor), round(height * factor))
        return upright.resize(size, Image.Resampling.LANCZOS)

    def cropped(fraction: float) -> Any:
        dx, dy = round(width * fraction), round(height * fraction)
        return upright.crop((dx, dy, width - dx, height - dy))

    return {
        "reencoded-q70": encode(upright, quality=70),
        "resized-1/2": encode(resized(0.5), quality=85),
        "cropped-1%": encode(cropped(0.01), quality=85),
        "cropped-2%": encode(cropped(0.02), quality=85),
        "screenshot-png": encode(resized(1080 / max(width, height)), "PNG"),
    }


def distance(a: bytes, b: bytes) -> int:
    return sum((x ^ y).bit_count() for x, y in zip(a, b, strict=True))


def summary(values: list[int] | list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(array.mean()), 2),
        "p95": round(float(np.percentile(array, 95)), 2),
        "max": round(float(array.max()), 2),
    }


# Per image and variant (None: the photo itself), PDQ bits: "full" at full resolution,
# and per minimum side.
Hashes = dict[tuple[str, str | None], dict[int | str, bytes]]


def main() -> None:
    args = parse_args()
    import pdqhash
    import torch
    from PIL import Image

    from moderation.config import Settings
    from moderation.images.decode import DecodeLimits, decode
    from moderation.images.hashing import pdq

    torch.set_num_threads(1)
    preprocess = production_preprocessing()
    full_limits = DecodeLimits.from_settings(Settings(full_resolution_decode=True))

    def limits_for(min_side: int | None) -> DecodeLimits:
        return replace(full_limits, decode_min_side=min_side)

    def signals(data: bytes, min_side: int | None) -> tuple[bytes, np.ndarray, int]:
        """PDQ bits and CLIP crop of frame 0, and the decode scale."""
        decoded = decode(
            data, limits_for(min_side), lambda frame, sampled: (pdq(frame).bits, preprocess(frame))
        )
        bits, crop = decoded.frames[0][1]
        return bits, crop, decoded.scale

    started = time.perf_counter()
    photos = held_out(args.photos, args.synthetic)
    print(f"{len(photos)} held-out photos made in {time.perf_counter() - started:.0f} s")

    families = ("photos", "synthetic")
    drift: dict[tuple[str, int], list[int]] = {
        (f, side): [] for f in families for side in MIN_SIDES
    }
    crop_error: dict[int, list[float]] = {side: [] for side in MIN_SIDES}
    scales: dict[int, set[int]] = {side: set() for side in MIN_SIDES}
    meta_file_hasher: list[int] = []
    ours_equal_reference = 0
    per_photo = []
    hashes: Hashes = {}
    for photo in photos:
        family = "synthetic" if photo.label.startswith("synthetic") else "photos"
        upright = decode(photo.jpeg, full_limits).frames[0][1]
        vector, _ = pdqhash.compute(np.asarray(upright))
        reference = np.packbits(vector.astype(np.uint8)).tobytes()
        # Meta's C++ file hasher first resizes anything over 512 pixels to 512x512 (CImg's
        # default resize: nearest neighbour); Pillow's nearest neighbour stands in for it.
        squeezed = upright.resize((512, 512), Image.Resampling.NEAREST)
        meta_file_hasher.append(distance(pdq(squeezed).bits, reference))
        full_bits, full_crop, _ = signals(photo.jpeg, None)
        ours_equal_reference += full_bits == reference
        row: dict[str, Any] = {"photo": photo.label, "bytes": len(photo.jpeg)}
        hashes[(photo.label, None)] = {"full": full_bits}
        for side in MIN_SIDES:
            bits, crop, scale = signals(photo.jpeg, side)
            hashes[(photo.label, None)][side] = bits
            drift[(family, side)].append(distance(bits, reference))
            crop_error[side].append(float(np.abs(crop.astype(np.int16) - full_crop).mean()))
            scales[side].add(scale)
            row[f"drift_min_side_{side}"] = drift[(family, side)][-1]
        row["drift_meta_file_hasher"] = meta_file_hasher[-1]
        per_photo.append(row)
        for variant, data in near_duplicates(upright).items():
            entry: dict[int | str, bytes] = {"full": signals(data, None)[0]}
            for side in MIN_SIDES:
                entry[side] = signals(data, side)[0]
            hashes[(photo.label, variant)] = entry
    print(f"hashed in {time.perf_counter() - started:.0f} s")

    results: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "photos": len(photos),
        "margin": args.margin,
        "size": "4032x3024 (portrait ones 3024x4032)",
        "our_full_resolution_pdq_equal_to_pdqhash": f"{ours_equal_reference}/{len(photos)}",
        "meta_file_hasher_emulation_distance_to_reference": summary(meta_file_hasher),
        "per_min_side": {},
        "per_photo": per_photo,
    }
    for side in MIN_SIDES:
        results["per_min_side"][str(side)] = {
            "scale_at_4032x3024": f"1/{max(scales[side])}",
            "pdq_distance_to_reference": {
                family: summary(drift[(family, side)])
                for family in families
                if drift[(family, side)]
            },
            "clip_crop_mean_abs_difference": summary(crop_error[side]),
            "hits": hits(photos, hashes, side, args.margin),
        }
    results["cost_ms"] = {
        "4032x3024": costs(photos[:3], limits_for, preprocess, args.repeats),
        "640x480": costs(
            [Photo(p.label, shrink(p.jpeg, (640, 480), full_limits)) for p in photos[:3]],
            limits_for,
            preprocess,
            args.repeats,
        ),
    }
    results["seconds"] = round(time.perf_counter() - started)
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


def hits(photos: list[Photo], hashes: Hashes, side: int, margin: int) -> dict[str, Any]:
    """Matching at the threshold with a reduced decode against full resolution, over
    near-duplicate and unrelated pairs. Near-duplicates: the bank holds the photo, hashed
    by the same decode as the upload ("same_decode") or at full resolution ("bank_full",
    and "bank_full_rehashed" with the worker's fallback within `margin`); "full" is both
    at full resolution."""
    per_variant: dict[str, dict[str, list[int]]] = {}
    crossings = []
    rehashes = 0
    for (label, variant), entry in hashes.items():
        if variant is None:
            continue
        original = hashes[(label, None)]
        pair = {
            "full": distance(original["full"], entry["full"]),
            "same_decode": distance(original[side], entry[side]),
            "bank_full": distance(original["full"], entry[side]),
        }
        pair["bank_full_rehashed"] = rehashed(pair["bank_full"], pair["full"], margin)
        rehashes += THRESHOLD < pair["bank_full"] <= THRESHOLD + margin
        kinds = per_variant.setdefault(variant, {kind: [] for kind in pair})
        for kind, value in pair.items():
            kinds[kind].append(value)
        for kind in ("same_decode", "bank_full", "bank_full_rehashed"):
            if (pair[kind] <= THRESHOLD) != (pair["full"] <= THRESHOLD):
                crossings.append(f"{label} {variant} ({kind}): {pair['full']} -> {pair[kind]}")
    near = {
        variant: {
            "pairs": len(kinds["full"]),
            **{f"distance_{kind}": summary(values) for kind, values in kinds.items()},
            **{
                f"matched_{kind}": sum(value <= THRESHOLD for value in values)
                for kind, values in kinds.items()
            },
        }
        for variant, kinds in per_variant.items()
    }
    unrelated: dict[str, list[int]] = {"full": [], "reduced": [], "bank_full": []}
    for a, b in itertools.permutations([p.label for p in photos], 2):
        if source_of(a) == source_of(b):
            continue  # two crops of one photo are not unrelated
        unrelated["full"].append(distance(hashes[(a, None)]["full"], hashes[(b, None)]["full"]))
        unrelated["reduced"].append(distance(hashes[(a, None)][side], hashes[(b, None)][side]))
        unrelated["bank_full"].append(distance(hashes[(a, None)]["full"], hashes[(b, None)][side]))
    return {
        "near_duplicates": near,
        "threshold_crossings": crossings,
        "near_duplicates_rehashed": rehashes,
        "unrelated_rehashed": sum(
            THRESHOLD < d <= THRESHOLD + margin for d in unrelated["bank_full"]
        ),
        "unrelated_pairs": len(unrelated["full"]),
        **{f"unrelated_closest_{kind}": min(values) for kind, values in unrelated.items()},
        **{
            f"unrelated_matching_{kind}": sum(value <= THRESHOLD for value in values)
            for kind, values in unrelated.items()
        },
    }


def source_of(label: str) -> str:
    """The source photo a held-out photo was made from."""
    return label if label.startswith("synthetic") else label.split("-")[0]


def rehashed(reduced: int, full: int, margin: int) -> int:
    """The distance the worker decides by, bank side at full resolution: the reduced one,
    or, when that is within `margin` beyond the threshold, the smaller of it and the full
    resolution one (the worker matches both hashes)."""
    if THRESHOLD < reduced <= THRESHOLD + margin:
        return min(reduced, full)
    return reduced


def costs(
    photos: list[Photo],
    limits_for: Callable[[int | None], Any],
    preprocess: Callable[[Any], np.ndarray],
    repeats: int,
) -> dict[str, dict[str, float]]:
    """Per image, the fastest of `repeats`: decode (all of `decode` but the visitor), PDQ,
    CLIP preprocessing, at full resolution and at each candidate minimum side."""
    from moderation.images.decode import decode
    from moderation.images.hashing import pdq

    def timed_signals(frame: Any, sampled: bool) -> tuple[float, float]:
        """What the intake does with a frame, timed: PDQ, then CLIP preprocessing."""
        began = time.perf_counter()
        pdq(frame)
        hashed = time.perf_counter()
        preprocess(frame)
        return hashed - began, time.perf_counter() - hashed

    # Settings interleaved within each repeat, so that a busy moment on a shared machine
    # slows them all rather than one.
    settings = (None, *MIN_SIDES)
    runs: dict[tuple[int | None, int], list[tuple[float, ...]]] = {}
    for _ in range(repeats):
        for index, photo in enumerate(photos):
            for side in settings:
                began = time.perf_counter()
                stages = decode(photo.jpeg, limits_for(side), timed_signals).frames[0][1]
                total = time.perf_counter() - began
                runs.setdefault((side, index), []).append((total - sum(stages), *stages))
    table: dict[str, dict[str, float]] = {}
    for side in settings:
        # The fastest run of each photo, averaged over the photos.
        fastest = np.mean(
            [np.min(np.asarray(runs[(side, index)]), axis=0) for index in range(len(photos))],
            axis=0,
        )
        row = {
            key: round(float(value) * 1000, 1)
            for key, value in zip(("decode", "pdq", "clip_preprocess"), fastest, strict=True)
        }
        row["total"] = round(sum(row.values()), 1)
        table["full" if side is None else f"min_side_{side}"] = row
    return table


def shrink(jpeg: bytes, size: tuple[int, int], limits: Any) -> bytes:
    from PIL import Image

    from moderation.images.decode import decode
    from tests.images import encode

    upright = decode(jpeg, limits).frames[0][1]
    return encode(upright.resize(size, Image.Resampling.LANCZOS), quality=90)


def production_preprocessing() -> Any:
    """The production checkpoint's preprocessing (openai/clip-vit-large-patch14-336: shortest
    edge 336, 336x336 centre crop, bicubic), built without its files."""
    from PIL import Image

    from moderation.embedding.preprocessing import Preprocessing

    return Preprocessing(
        shortest_edge=336,
        crop_height=336,
        crop_width=336,
        resample=Image.Resampling.BICUBIC,
        rescale_factor=1 / 255,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def report(results: dict[str, Any]) -> None:
    equal = results["our_full_resolution_pdq_equal_to_pdqhash"]
    meta = results["meta_file_hasher_emulation_distance_to_reference"]
    print(f"\nour full-resolution PDQ equal to pdqhash's: {equal}")
    print(f"Meta's file hasher (512x512 first), distance to the reference: {meta}")
    for side, figures in results["per_min_side"].items():
        print(f"\nmin side {side} ({figures['scale_at_4032x3024']} at 4032x3024)")
        for family, drift in figures["pdq_distance_to_reference"].items():
            print(f"  PDQ distance to the reference, {family}: {drift}")
        print(f"  CLIP crop mean |difference|: {figures['clip_crop_mean_abs_difference']}")
        found = figures["hits"]
        for variant, near in found["near_duplicates"].items():
            print(
                f"  {variant:>15}: matched {near['matched_full']}/{near['pairs']} at full "
                f"resolution, {near['matched_same_decode']} same decode, "
                f"{near['matched_bank_full']} bank at full, "
                f"{near['matched_bank_full_rehashed']} with the fallback; max distance "
                f"{near['distance_full']['max']:.0f} / {near['distance_same_decode']['max']:.0f}"
                f" / {near['distance_bank_full']['max']:.0f}"
            )
        for line in found["threshold_crossings"]:
            print(f"  crossed the threshold: {line}")
        print(
            f"  re-hashed at full resolution (margin {results['margin']}): "
            f"{found['near_duplicates_rehashed']} near-duplicate pairs, "
            f"{found['unrelated_rehashed']} unrelated"
        )
        print(
            f"  unrelated pairs: {found['unrelated_pairs']}, closest "
            f"{found['unrelated_closest_full']} (full) / {found['unrelated_closest_reduced']} "
            f"(reduced); matching {found['unrelated_matching_full']} / "
            f"{found['unrelated_matching_reduced']}"
        )
    for size, table in results["cost_ms"].items():
        print(f"\ncost per image at {size}, ms (one core):")
        for setting, row in table.items():
            print(f"  {setting:>15}: " + ", ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
