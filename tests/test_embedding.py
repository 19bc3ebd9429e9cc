from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from moderation.embedding.clip import ClipEmbedder, processor_class
from moderation.embedding.embedder import batch_shapes
from moderation.embedding.families import preprocessing_of
from tests.images import textured


@pytest.fixture(scope="module")
def embedder(tiny_model: Path) -> ClipEmbedder:
    return ClipEmbedder(str(tiny_model), "cpu")


@pytest.mark.parametrize("size", [(640, 480), (300, 451), (64, 64), (1000, 90)])
def test_preprocessing_matches_the_checkpoints_own_processor(
    tiny_model: Path, size: tuple[int, int]
) -> None:
    image = textured(7, size)
    reference = processor_class().from_pretrained(str(tiny_model))
    expected = reference(images=image, return_tensors="np")["pixel_values"][0]
    preprocessing = preprocessing_of(str(tiny_model))
    crop = torch.from_numpy(preprocessing(image)[np.newaxis])
    ours = preprocessing.normalise(crop)[0].numpy()
    assert ours.shape == expected.shape
    # Exact below twice the target size; above it, the box pre-reduction (reducing_gap=2)
    # may move a pixel by a few levels of 255, i.e. a few hundredths once normalised.
    np.testing.assert_allclose(ours, expected, atol=0.05)
    assert np.abs(ours - expected).mean() < 0.01


def test_embeddings_are_unit_float32_and_equal_to_the_models_own(
    embedder: ClipEmbedder, tiny_model: Path
) -> None:
    images = [textured(1), textured(2)]
    reference = processor_class().from_pretrained(str(tiny_model))
    pixels = reference(images=images, return_tensors="np")["pixel_values"]
    vectors = embedder.embed_pixel_values(torch.from_numpy(pixels))
    assert vectors.dtype == np.float32
    assert vectors.shape == (2, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    # The same checkpoint used directly through transformers agrees.
    model: Any = CLIPModel.from_pretrained(str(tiny_model))
    model.eval()
    with torch.inference_mode():
        output = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    expected = torch.nn.functional.normalize(features, dim=-1).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    # Through our own preprocessing, the embedding is the same to within its tolerance.
    ours = embedder.embed_images(images)
    assert float(np.min(np.sum(ours * expected, axis=1))) > 0.999


def test_tiny_model_is_a_complete_checkpoint(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokens = tokenizer(["red sports car"], return_tensors="pt")
    model: Any = CLIPModel.from_pretrained(str(tiny_model))
    model.eval()
    with torch.inference_mode():
        output = model.get_text_features(**tokens)
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    assert features.shape == (1, model.config.projection_dim)
    assert "random weights" in (tiny_model / "README.md").read_text()


def test_tiny_model_separates_different_images(embedder: ClipEmbedder) -> None:
    a, b = embedder.embed_images([textured(10), textured(11)])
    assert 1 - float(a @ b) > 0.1


def test_batch_shapes_cover_every_size_up_to_the_batch() -> None:
    assert batch_shapes(8) == [8]
    assert batch_shapes(128) == [8, 16, 32, 64, 128]
    assert batch_shapes(100) == [8, 16, 32, 64, 100]


def test_a_compiled_model_pads_partial_batches_and_returns_only_their_vectors(
    tiny_model: Path,
) -> None:
    """Through torch.compile (the eager backend: the same graph capture, no C compiler
    needed), for batch sizes between the compiled shapes."""
    plain = ClipEmbedder(str(tiny_model), "cpu")
    compiled = ClipEmbedder(str(tiny_model), "cpu")
    compiled.compile([8, 16], backend="eager", mode=None)
    crops = np.stack([plain.preprocess(textured(seed)) for seed in range(11)])
    for count in (1, 8, 11):
        expected = plain.embed(crops[:count])
        ours = compiled.embed(crops[:count])
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, atol=1e-5)
