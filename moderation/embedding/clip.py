"""CLIP image embeddings through Hugging Face `transformers` (4.x and 5.x).

Any CLIP checkpoint id or local directory loads through `from_pretrained`, the tiny test
model included. Preprocessing reproduces the checkpoint's own image processor in two
halves: the resize and centre crop run with PIL in the decode threads, and the rescale and
normalisation run on the whole batch, on the model's device, just before the forward pass
(uint8 crops are also a quarter of the size to hold and to copy to a GPU).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel
from transformers.utils import logging as transformers_logging

from moderation.config import Settings
from moderation.embedding.checkpoints import check_loadable, loading

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    shortest_edge: int
    crop_height: int
    crop_width: int
    resample: Image.Resampling
    rescale_factor: float
    mean: torch.Tensor  # shape (1, 3, 1, 1)
    std: torch.Tensor  # shape (1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, name: str) -> Preprocessing:
        processor = _load_image_processor(name)
        size, crop = dict(processor.size), dict(processor.crop_size)
        shortest = size.get("shortest_edge") or min(size["height"], size["width"])
        return cls(
            shortest_edge=int(shortest),
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            resample=Image.Resampling(int(processor.resample)),
            rescale_factor=float(processor.rescale_factor),
            mean=torch.tensor(processor.image_mean, dtype=torch.float32).reshape(1, 3, 1, 1),
            std=torch.tensor(processor.image_std, dtype=torch.float32).reshape(1, 3, 1, 1),
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB image resized and centre-cropped: uint8, shape (crop_height, crop_width, 3)."""
        width, height = image.size
        # As transformers' get_resize_output_image_size: the long side is truncated.
        if width <= height:
            size = (self.shortest_edge, int(self.shortest_edge * height / width))
        else:
            size = (int(self.shortest_edge * width / height), self.shortest_edge)
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
        mean, std = self.mean.to(crops.device), self.std.to(crops.device)
        return (pixels - mean) / std


def batch_shapes(max_batch: int) -> list[int]:
    """The batch sizes a compiled model is built for: powers of two from 8, and the largest.
    A partial batch is padded to the next, so at most twice the work for a few shapes
    instead of a recompilation for every size the batcher happens to form."""
    shapes = {max_batch}
    size = 8
    while size < max_batch:
        shapes.add(size)
        size *= 2
    return sorted(shapes)


def _padded(batch: torch.Tensor, shapes: Sequence[int]) -> torch.Tensor:
    size = next((shape for shape in shapes if shape >= len(batch)), None)
    if size is None or size == len(batch):
        return batch
    padding = batch.new_zeros((size - len(batch), *batch.shape[1:]))
    return torch.cat([batch, padding])


def processor_class() -> Any:
    try:  # transformers 5: the PIL backend, which needs no torchvision
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _load_image_processor(name: str) -> Any:
    return processor_class().from_pretrained(name)


def quiet_transformers() -> None:
    """No progress bars on stderr: workers log, and CLI output stays readable."""
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def projection_dim(config: Any) -> int:
    """The embedding size of a CLIP config."""
    dim = getattr(config, "projection_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"not a CLIP config (no projection_dim): {type(config).__name__}")
    return dim


class ClipEmbedder:
    """A loaded CLIP model. `embed` may be called from several threads at once: inference
    only reads the weights, so concurrent forward passes share one copy of the model."""

    def __init__(self, name: str, device: str, *, cpu_threads: int | None = None) -> None:
        self.name = name
        self.device = torch.device(device)
        if self.device.type == "cpu" and cpu_threads:
            # Per forward pass; torch applies it to every thread that runs one.
            torch.set_num_threads(cpu_threads)
        # fp16 halves memory and roughly doubles throughput on GPUs; CPUs stay in fp32.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        logger.info("loading CLIP %s on %s (%s)", name, self.device, self.dtype)
        quiet_transformers()
        check_loadable(name)
        with loading(name):
            model: Any = CLIPModel.from_pretrained(name)
            self.preprocess = Preprocessing.from_pretrained(name)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.dim = projection_dim(model.config)
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        # Set by `compile`: the compiled image tower and the batch sizes it was built for.
        self._compiled: Any = None
        self._shapes: list[int] = []

    @classmethod
    def for_worker(cls, settings: Settings) -> ClipEmbedder:
        """The configured model as a worker runs it (and the benchmark's baseline with it):
        on CPU, each inference stream gets its share of the cores; compiled where that is
        configured (by default on CUDA)."""
        embedder = cls(
            settings.resolved_model(),
            settings.resolved_device(),
            cpu_threads=settings.resolved_torch_threads(),
        )
        if settings.resolved_compile():
            embedder.compile(batch_shapes(settings.resolved_batch_size()))
        return embedder

    def compile(
        self,
        shapes: Sequence[int],
        *,
        backend: str = "inductor",
        mode: str | None = "max-autotune-no-cudagraphs",
    ) -> float:
        """Compile the image tower for batches of these sizes (a smaller batch is padded to
        the next), each compiled now rather than under the first uploads; the seconds it
        took. Measured on an H100, ViT-L/14-336 fp16, batch 128: 1,163 images/s compiled
        against 933 eager (`../shared/gpu/README.md`)."""
        started = time.perf_counter()
        self._compiled = torch.compile(
            self.model.get_image_features, backend=backend, mode=mode, dynamic=False
        )
        self._shapes = sorted(set(shapes))
        height, width = self.preprocess.crop_height, self.preprocess.crop_width
        for size in self._shapes:
            self.embed(np.zeros((size, height, width, 3), dtype=np.uint8))
        seconds = time.perf_counter() - started
        logger.info("compiled CLIP for batches of %s in %.1f s", self._shapes, seconds)
        return seconds

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Crops from `preprocess`, uint8 (n, H, W, 3), to L2-normalised float32 (n, dim)."""
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(crops))
            if self.device.type == "cuda":
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            return self.embed_pixel_values(self.preprocess.normalise(batch))

    def embed_pixel_values(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Model-ready pixel values (n, 3, H, W) to L2-normalised float32 (n, dim)."""
        with torch.inference_mode():
            batch = pixel_values.to(self.device, dtype=self.dtype)
            count = len(batch)
            if self._compiled is not None:
                output = self._compiled(pixel_values=_padded(batch, self._shapes))
            else:
                output = self.model.get_image_features(pixel_values=batch)
            # transformers 5 returns a model output whose pooler_output is the projection.
            features = output if isinstance(output, torch.Tensor) else output.pooler_output
            features = torch.nn.functional.normalize(features[:count].float(), dim=-1)
            result: np.ndarray = features.cpu().numpy()
            return result

    def embed_one(self, crop: np.ndarray) -> np.ndarray:
        vector: np.ndarray = self.embed(crop[np.newaxis])[0]
        return vector

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed(np.stack([self.preprocess(image) for image in images]))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts through the same checkpoint's tokenizer and text tower: L2-normalised
        float32 (n, dim), comparable with its image embeddings by inner product."""
        tokenizer = self._load_tokenizer()
        # The text tower's position table bounds the tokens; some tokenizers say more.
        longest = min(
            int(tokenizer.model_max_length),
            int(self.model.config.text_config.max_position_embeddings),
        )
        # A fast tokenizer sets padding and truncation on its shared Rust state per call, and
        # refuses ("Already borrowed") to be called from two threads at once.
        with self._tokenizer_lock:
            tokens = tokenizer(
                list(texts), padding=True, truncation=True, max_length=longest, return_tensors="pt"
            )
        with torch.inference_mode():
            output = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            features = output if isinstance(output, torch.Tensor) else output.pooler_output
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            result: np.ndarray = features.cpu().numpy()
            return result

    def _load_tokenizer(self) -> Any:
        """Loaded on the first text query: screening never needs it."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.name)
            return self._tokenizer
