"""What a model's image processor does, as a small picklable description that intake
processes apply without the model.

Preprocessing runs in two halves: the resize (and, for CLIP, the centre crop) runs with
PIL in the intake processes, and the rescale and normalisation run on the whole batch,
on the model's device, just before the forward pass (uint8 crops are also a quarter of
the size to hold and to copy to a GPU). Two families differ in the first half:

- CLIP: the shorter side to `shortest_edge`, then a centre crop of `crop` (the
  checkpoint's `size.shortest_edge` and `crop_size`);
- SigLIP: the whole image to `crop` exactly, aspect ratio not kept, no crop (the
  checkpoint's `size.height` and `size.width`).

The description is part of a model's identity (`fingerprint_fields`): the same weights
fed other pixels are another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    # The side the shorter one is resized to before a centre crop; None: the image is
    # resized to (crop_height, crop_width) whole, without a crop (SigLIP).
    shortest_edge: int | None
    crop_height: int
    crop_width: int
    resample: Image.Resampling
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: Any, *, centre_crop: bool) -> Preprocessing:
        """From a `transformers` image processor (loaded from the checkpoint's own
        `preprocessor_config.json`)."""
        size = dict(processor.size)
        if centre_crop:
            crop = dict(processor.crop_size)
            shortest: int | None = size.get("shortest_edge") or min(size["height"], size["width"])
            height, width = int(crop["height"]), int(crop["width"])
        else:
            if "height" not in size or "width" not in size:
                raise ValueError(f"expected a fixed size (height and width), got {size}")
            shortest, (height, width) = None, (int(size["height"]), int(size["width"]))
        return cls(
            shortest_edge=None if shortest is None else int(shortest),
            crop_height=height,
            crop_width=width,
            resample=Image.Resampling(int(processor.resample)),
            rescale_factor=float(processor.rescale_factor),
            mean=_three(processor.image_mean),
            std=_three(processor.image_std),
        )

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return (self.crop_height, self.crop_width, 3)

    @property
    def decode_side(self) -> int:
        """The side a reduced JPEG decode must keep: below it, the model's input would be
        upsampled from fewer pixels than the reference processor sees."""
        return self.shortest_edge or min(self.crop_height, self.crop_width)

    def fingerprint_fields(self) -> dict[str, object]:
        return {
            "shortest_edge": self.shortest_edge,
            "crop": [self.crop_height, self.crop_width],
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB image resized (and cropped): uint8, shape (crop_height, crop_width, 3)."""
        if self.shortest_edge is None:
            # reducing_gap=2, as below: a box reduction first while twice the target remains.
            resized = image.resize(
                (self.crop_width, self.crop_height), self.resample, reducing_gap=2.0
            )
            return np.array(resized)
        return self._resize_and_crop(image, self.shortest_edge)

    def _resize_and_crop(self, image: Image.Image, shortest_edge: int) -> np.ndarray:
        width, height = image.size
        # As transformers' get_resize_output_image_size: the long side is truncated.
        if width <= height:
            size = (shortest_edge, int(shortest_edge * height / width))
        else:
            size = (int(shortest_edge * width / height), shortest_edge)
        left = (size[0] - self.crop_width) // 2
        top = (size[1] - self.crop_height) // 2
        if left < 0 or top < 0:  # a crop larger than the resized image: the reference pads
            resized = image.resize(size, self.resample)
            box = (left, top, left + self.crop_width, top + self.crop_height)
            return np.array(resized.crop(box))
        # Resample only the crop's preimage, at the same positions and scale as resizing the
        # whole image and then cropping, for a fraction of the work. reducing_gap=2: a box
        # reduction by an integer factor first while twice the target size remains.
        # Measured against the reference: equal below twice the target, within 3/255 above.
        scale_x, scale_y = width / size[0], height / size[1]
        preimage = (
            left * scale_x,
            top * scale_y,
            (left + self.crop_width) * scale_x,
            (top + self.crop_height) * scale_y,
        )
        cropped = image.resize(
            (self.crop_width, self.crop_height), self.resample, box=preimage, reducing_gap=2.0
        )
        return np.array(cropped)  # a writable copy: torch refuses to wrap read-only memory

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops (n, H, W, 3) to the model's pixel values (n, 3, H, W), float32."""
        pixels = crops.permute(0, 3, 1, 2).to(torch.float32) * self.rescale_factor
        mean = torch.tensor(self.mean, dtype=torch.float32, device=crops.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=crops.device)
        return (pixels - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)


def _three(values: Any) -> tuple[float, float, float]:
    first, second, third = (float(v) for v in values)
    return (first, second, third)
