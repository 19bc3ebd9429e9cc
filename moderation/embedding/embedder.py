"""The embedder interface: one base class for every dual encoder the service runs (CLIP,
SigLIP), in the spirit of immich's `InferenceModel`.

- **Lazy, locked loading.** Constructing an embedder reads the checkpoint's small config
  files only (its family, `dim`, `preprocess`); the weights load on first use, once,
  whichever thread asks first (`load`), so a process that never embeds never pays.
- **Preprocessing without the model.** `preprocess` is a picklable description that
  intake processes apply (`moderation.embedding.preprocessing`); the batch's rescale and
  normalisation run on the model's device.
- **Identity.** A model is its name plus a fingerprint of its weights and preprocessing
  (`fingerprint`): the registry refuses the same name with other weights.
- **Families** are chosen from the checkpoint's config (`model_type`), never from its
  name, so any local directory or Hugging Face id loads unchanged
  (`moderation.embedding.families.open_embedder`).

Subclasses implement `_load_model`, `_processor_class`, `_centre_crop` and
`_tokenize`; the forward passes are shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from moderation.embedding.checkpoints import loading
from moderation.embedding.preprocessing import Preprocessing
from moderation.errors import Invalid

logger = logging.getLogger(__name__)


class UnsupportedModel(Invalid):
    """A checkpoint of a family the service cannot run."""

    code = "unsupported_model"


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


def quiet_transformers() -> None:
    """No progress bars on stderr: workers log, and CLI output stays readable."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Embedder:
    """A dual encoder: images and texts into one space, L2-normalised float32 vectors
    compared by inner product. Thread-safe: inference only reads the weights, so
    concurrent forward passes share one copy of the model."""

    family: ClassVar[str]

    def __init__(
        self, name: str, device: str = "cpu", *, config: Any, cpu_threads: int | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.device = torch.device(device)
        self._cpu_threads = cpu_threads
        # fp16 halves memory and roughly doubles throughput on GPUs; CPUs stay in fp32.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dim = self._dim(config)
        with loading(name):
            processor = self._processor_class().from_pretrained(name)
        self.preprocess = Preprocessing.from_processor(processor, centre_crop=self._centre_crop)
        self._model: Any = None
        self._fingerprint: str | None = None
        self._load_lock = threading.Lock()
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        # Set by `compile`: the compiled image tower and the batch sizes it was built for.
        self._compiled: Any = None
        self._shapes: list[int] = []

    # What each family says.

    _centre_crop: ClassVar[bool]

    @staticmethod
    def _processor_class() -> Any:
        raise NotImplementedError

    def _load_model(self) -> Any:
        """The model, from `self.name`, in eval mode on the CPU, in float32."""
        raise NotImplementedError

    def _dim(self, config: Any) -> int:
        raise NotImplementedError

    def _tokenize(self, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # Loading.

    def load(self) -> Embedder:
        """Load the weights now (once; other threads wait for the first)."""
        self.model()
        return self

    def model(self) -> Any:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    started = time.perf_counter()
                    logger.info(
                        "loading %s %s on %s (%s)", self.family, self.name, self.device, self.dtype
                    )
                    quiet_transformers()
                    if self.device.type == "cpu" and self._cpu_threads:
                        # Per forward pass; torch applies it to every thread that runs one.
                        torch.set_num_threads(self._cpu_threads)
                    with loading(self.name):
                        model = self._load_model()
                    # Before the conversion to the device's dtype: the same checkpoint has
                    # the same fingerprint on a CPU and on a GPU.
                    self._fingerprint = self._fingerprint_of(model)
                    self._model = model.to(device=self.device, dtype=self.dtype).eval()
                    logger.info(
                        "loaded %s in %.1f s (fingerprint %s)",
                        self.name,
                        time.perf_counter() - started,
                        self._fingerprint[:12],
                    )
        return self._model

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the family, the preprocessing and every weight (names, shapes,
        dtypes and values as loaded, before any conversion): what makes two checkpoints
        of one name the same model. Loads the weights."""
        self.model()
        assert self._fingerprint is not None
        return self._fingerprint

    def _fingerprint_of(self, model: Any) -> str:
        digest = hashlib.sha256()
        described = {"family": self.family, "preprocessing": self.preprocess.fingerprint_fields()}
        digest.update(json.dumps(described, sort_keys=True).encode())
        for name, tensor in sorted(model.state_dict().items()):
            value = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{value.dtype}:{tuple(tensor.shape)}".encode())
            # Raw bytes without a copy (bfloat16 has no numpy dtype, so through uint8).
            digest.update(value.view(torch.uint8).numpy().data if value.numel() else b"")
        return digest.hexdigest()

    # Images.

    def compile(
        self,
        shapes: Sequence[int],
        *,
        backend: str = "inductor",
        mode: str | None = "max-autotune-no-cudagraphs",
    ) -> float:
        """Compile the image tower for batches of these sizes (a smaller batch is padded to
        the next), each compiled now rather than under the first uploads; the seconds it
        took. Measured on an H100, CLIP ViT-L/14-336 fp16, batch 128: 1,163 images/s
        compiled against 933 eager (bench/README.md, "On a GPU")."""
        started = time.perf_counter()
        self._compiled = torch.compile(
            self.model().get_image_features, backend=backend, mode=mode, dynamic=False
        )
        self._shapes = sorted(set(shapes))
        for size in self._shapes:
            self.embed(np.zeros((size, *self.preprocess.crop_shape), dtype=np.uint8))
        seconds = time.perf_counter() - started
        logger.info("compiled %s for batches of %s in %.1f s", self.name, self._shapes, seconds)
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
        model = self.model()
        with torch.inference_mode():
            batch = pixel_values.to(self.device, dtype=self.dtype)
            count = len(batch)
            if self._compiled is not None:
                output = self._compiled(pixel_values=_padded(batch, self._shapes))
            else:
                output = model.get_image_features(pixel_values=batch)
            features = torch.nn.functional.normalize(_features(output)[:count].float(), dim=-1)
            result: np.ndarray = features.cpu().numpy()
            return result

    def embed_one(self, crop: np.ndarray) -> np.ndarray:
        vector: np.ndarray = self.embed(crop[np.newaxis])[0]
        return vector

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed(np.stack([self.preprocess(image) for image in images]))

    # Texts.

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts through the same checkpoint's tokenizer and text tower: L2-normalised
        float32 (n, dim), comparable with its image embeddings by inner product."""
        model = self.model()
        tokenizer = self._load_tokenizer()
        # A fast tokenizer sets padding and truncation on its shared Rust state per call, and
        # refuses ("Already borrowed") to be called from two threads at once.
        with self._tokenizer_lock:
            tokens = self._tokenize(tokenizer, list(texts))
        with torch.inference_mode():
            output = model.get_text_features(
                **{key: value.to(self.device) for key, value in tokens.items()}
            )
            features = torch.nn.functional.normalize(_features(output).float(), dim=-1)
            result: np.ndarray = features.cpu().numpy()
            return result

    def _text_positions(self, tokenizer: Any) -> int:
        """The text tower's position table bounds the tokens; some tokenizers say more."""
        return min(
            int(tokenizer.model_max_length),
            int(self.config.text_config.max_position_embeddings),
        )

    def _load_tokenizer(self) -> Any:
        """Loaded on the first text query: screening never needs it."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.name)
            return self._tokenizer
