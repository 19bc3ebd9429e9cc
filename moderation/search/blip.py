"""BLIP's image-text matching head (`BlipForImageTextRetrieval`): how well a text describes
an image, from the two looked at together (cross-attention from the text to the image's
patches), not from two separately computed vectors as CLIP's cosine.

Loaded through `from_pretrained` from a checkpoint id or a local directory
(`Salesforce/blip-itm-base-coco`, `Salesforce/blip-itm-large-coco`, ...), lazily and once
per process and checkpoint. `write_random_blip` writes a checkpoint with random weights,
as `moderation.embedding.tiny` does for CLIP: tests load a tiny one, and the benchmark the
base architecture, both through the same `from_pretrained` path as a real checkpoint.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BlipForImageTextRetrieval, BlipProcessor

# Images scored in one forward pass: BLIP base at 384 px holds ~0.6 GB of activations per
# 16 images on a CPU, and a GPU is no faster per image beyond that.
_BATCH = 16


class ImageTextMatcher:
    """The probability that a text matches each of some images, by BLIP's ITM head."""

    def __init__(self, checkpoint: str, device: str = "cpu") -> None:
        self.checkpoint = checkpoint
        self.device = device
        self._lock = threading.Lock()
        self._loaded: tuple[BlipForImageTextRetrieval, BlipProcessor] | None = None

    def _load(self) -> tuple[BlipForImageTextRetrieval, BlipProcessor]:
        with self._lock:
            if self._loaded is None:
                from transformers import BlipForImageTextRetrieval, BlipProcessor

                from moderation.embedding.embedder import quiet_transformers

                quiet_transformers()
                # transformers' `to` is typed through a decorator mypy cannot follow.
                loaded: Any = BlipForImageTextRetrieval.from_pretrained(self.checkpoint)
                model: BlipForImageTextRetrieval = loaded.to(device=self.device).eval()
                processor = BlipProcessor.from_pretrained(self.checkpoint)
                self._loaded = (model, processor)
            return self._loaded

    def scores(self, text: str, images: Sequence[Image.Image]) -> np.ndarray:
        """P(match) of `text` with each image, in [0, 1], in the images' order."""
        import torch

        if not images:
            return np.zeros(0, dtype=np.float32)
        model, processor = self._load()
        found: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(images), _BATCH):
                batch = list(images[start : start + _BATCH])
                inputs = processor(
                    images=batch, text=[text] * len(batch), return_tensors="pt", padding=True
                ).to(self.device)
                logits = model(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"],
                    use_itm_head=True,
                ).itm_score
                found.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy())
        return np.concatenate(found).astype(np.float32)


_MATCHERS: dict[tuple[str, str], ImageTextMatcher] = {}
_MATCHERS_LOCK = threading.Lock()


def matcher(checkpoint: str, device: str = "cpu") -> ImageTextMatcher:
    """The process's matcher for a checkpoint: its weights are loaded once, at first use."""
    with _MATCHERS_LOCK:
        key = (checkpoint, device)
        if key not in _MATCHERS:
            _MATCHERS[key] = ImageTextMatcher(checkpoint, device)
        return _MATCHERS[key]


# Random-weight architectures: "tiny" for tests; "base" has the shapes of
# Salesforce/blip-itm-base-coco (ViT-B/16 at 384 px, a 12-layer BERT-base text encoder
# with cross-attention, its 30,524-token vocabulary) for benchmarks of speed.
BLIP_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "max_position_embeddings": 64,
        },
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 16,
            # BLIP's vision tower starts at a standard deviation of 1e-10 (real weights
            # replace it); a random one that small scores every image the same.
            "initializer_range": 0.2,
        },
        "vocab_size": 0,
        "image_text_hidden_size": 32,
    },
    "base": {
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "max_position_embeddings": 512,
        },
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": 384,
            "patch_size": 16,
            "initializer_range": 0.02,
        },
        "vocab_size": 30_524,
        "image_text_hidden_size": 256,
    },
}
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def _write_tokenizer(directory: Path, vocab_size: int) -> int:
    """A BERT WordPiece vocabulary of single characters (every word tokenises to its
    characters), padded with unused tokens to `vocab_size`; its length."""
    from transformers import BertTokenizer

    characters = [chr(c) for c in range(33, 127)]
    tokens = [*_SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)]
    tokens += [f"[unused{i}]" for i in range(max(0, vocab_size - len(tokens)))]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # BLIP's processor starts texts with [DEC] as its bos token, as Salesforce's does.
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    tokenizer.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **json.loads((directory / "tokenizer_config.json").read_text()),
                "tokenizer_class": "BertTokenizer",
            }
        )
    )
    return len(tokens)


def write_random_blip(directory: Path, architecture: str = "tiny", *, seed: int = 0) -> Path:
    """Write a BLIP image-text matching checkpoint with random weights: config, weights,
    tokenizer and processor, loadable by `ImageTextMatcher` like a real one."""
    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    from moderation.embedding.embedder import quiet_transformers

    quiet_transformers()
    spec = BLIP_ARCHITECTURES[architecture]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(directory, spec["vocab_size"])
    config = BlipConfig(
        text_config={
            **spec["text"],
            "vocab_size": vocab,
            "pad_token_id": 0,
            "bos_token_id": _SPECIAL_TOKENS.index("[DEC]"),
            "sep_token_id": _SPECIAL_TOKENS.index("[SEP]"),
        },
        vision_config=spec["vision"],
        image_text_hidden_size=spec["image_text_hidden_size"],
    )
    torch.manual_seed(seed)
    BlipForImageTextRetrieval(config).save_pretrained(directory)
    side = spec["vision"]["image_size"]
    BlipImageProcessor(size={"height": side, "width": side}).save_pretrained(directory)
    (directory / "README.md").write_text(
        f"# Random BLIP image-text matching ({architecture})\n\nRandom weights: its scores "
        "mean nothing; for tests and benchmarks of speed only.\n"
    )
    return directory
