"""SigLIP and fixed-resolution SigLIP 2 (`SiglipModel`) through Hugging Face `transformers`.

What differs from CLIP, as the checkpoints' own processors do it:

- images are resized whole to the model's square input, aspect ratio not kept, with no
  centre crop (`size.height` and `size.width`), and normalised with the checkpoint's
  mean and std (0.5 for the published ones);
- texts are padded to `max_length` (64 tokens for the published ones): the text tower
  pools the last position, and was trained on padded texts only, so a text padded to the
  longest of its batch would embed differently alone and in company.

SigLIP 2 NaFlex checkpoints (`Siglip2Model`, variable resolution) are refused by
`open_embedder`: their inputs are patch sequences of varying length, not one crop.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moderation.embedding.embedder import Embedder


class SiglipEmbedder(Embedder):
    family = "siglip"
    _centre_crop: ClassVar[bool] = False

    @staticmethod
    def _processor_class() -> Any:
        try:  # transformers 5: the PIL backend, which needs no torchvision
            from transformers import SiglipImageProcessorPil

            return SiglipImageProcessorPil
        except ImportError:  # transformers 4
            from transformers import SiglipImageProcessor

            return SiglipImageProcessor

    def _dim(self, config: Any) -> int:
        # The image and text towers' pooled outputs share the vision tower's width.
        dim = config.vision_config.hidden_size
        if dim != config.text_config.projection_size:
            raise ValueError(
                f"{self.name}: the text tower projects to {config.text_config.projection_size} "
                f"dimensions, the image tower to {dim}"
            )
        return int(dim)

    def _load_model(self) -> Any:
        from transformers import SiglipModel

        return SiglipModel.from_pretrained(self.name)

    def _tokenize(self, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self._text_positions(tokenizer),
            return_tensors="pt",
        )
        # The ids alone: the text tower was trained (in big_vision) on padded texts with no
        # attention mask, and pools the last position, padding included.
        return {"input_ids": tokens["input_ids"]}
