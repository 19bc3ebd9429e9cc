"""CLIP (`CLIPModel`) through Hugging Face `transformers` (4.x and 5.x).

Any CLIP checkpoint id or local directory loads through `from_pretrained`, the tiny test
model included. Its image processor resizes the shorter side and crops the centre
(`moderation.embedding.preprocessing`); its text tower pools at the end-of-text token, so
texts are padded to the longest of a batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moderation.embedding.checkpoints import check_loadable, loading
from moderation.embedding.embedder import Embedder


def processor_class() -> Any:
    try:  # transformers 5: the PIL backend, which needs no torchvision
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def projection_dim(config: Any) -> int:
    """The embedding size of a CLIP config."""
    dim = getattr(config, "projection_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"not a CLIP config (no projection_dim): {type(config).__name__}")
    return dim


class ClipEmbedder(Embedder):
    family = "clip"
    _centre_crop: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        device: str = "cpu",
        *,
        config: Any = None,
        cpu_threads: int | None = None,
    ) -> None:
        if config is None:
            from transformers import CLIPConfig

            check_loadable(name)
            with loading(name):
                config = CLIPConfig.from_pretrained(name)
        super().__init__(name, device, config=config, cpu_threads=cpu_threads)

    @staticmethod
    def _processor_class() -> Any:
        return processor_class()

    def _dim(self, config: Any) -> int:
        return projection_dim(config)

    def _load_model(self) -> Any:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.name)

    def _tokenize(self, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self._text_positions(tokenizer),
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
