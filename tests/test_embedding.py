from __future__ import annotations

import json
import shutil
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel, SiglipModel

from moderation.embedding.clip import ClipEmbedder, processor_class
from moderation.embedding.embedder import Embedder, UnsupportedModel, batch_shapes
from moderation.embedding.families import open_embedder, preprocessing_of
from moderation.embedding.siglip import SiglipEmbedder
from moderation.embedding.tiny import write_tiny_siglip
from moderation.images.decode import DecodeLimits
from moderation.images.signals import extract_signals
from tests.conftest import TEST_SETTINGS
from tests.images import encode, textured


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


# SigLIP, and what every family shares.


@pytest.fixture(scope="module")
def siglip(tiny_siglip: Path) -> Embedder:
    return open_embedder(str(tiny_siglip))


@pytest.mark.parametrize("size", [(640, 480), (300, 451), (64, 64), (1000, 90)])
def test_siglip_preprocessing_matches_the_checkpoints_own_processor(
    siglip: Embedder, tiny_siglip: Path, size: tuple[int, int]
) -> None:
    """Resized whole to the square input (no centre crop), normalised with its own mean
    and std: as SiglipImageProcessor does it."""
    image = textured(7, size)
    reference = SiglipEmbedder._processor_class().from_pretrained(str(tiny_siglip))
    expected = reference(images=image, return_tensors="np")["pixel_values"][0]
    ours = siglip.preprocess.normalise(torch.from_numpy(siglip.preprocess(image)[np.newaxis]))
    assert siglip.preprocess.shortest_edge is None
    assert ours.shape[1:] == expected.shape
    np.testing.assert_allclose(ours[0].numpy(), expected, atol=0.05)
    assert np.abs(ours[0].numpy() - expected).mean() < 0.01


def test_siglip_embeddings_are_the_models_own(siglip: Embedder, tiny_siglip: Path) -> None:
    images = [textured(1), textured(2)]
    reference = SiglipEmbedder._processor_class().from_pretrained(str(tiny_siglip))
    pixels = reference(images=images, return_tensors="pt")["pixel_values"]
    model: Any = SiglipModel.from_pretrained(str(tiny_siglip))
    model.eval()
    with torch.inference_mode():
        output = model.get_image_features(pixel_values=pixels)
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    expected = torch.nn.functional.normalize(features, dim=-1).numpy()
    np.testing.assert_allclose(siglip.embed_pixel_values(pixels), expected, atol=1e-5)
    assert float(np.min(np.sum(siglip.embed_images(images) * expected, axis=1))) > 0.999


def test_siglip_texts_are_padded_to_max_length_alone_or_together(
    siglip: Embedder, tiny_siglip: Path
) -> None:
    """The text tower pools the last position: a text padded to the longest of its batch
    would embed differently alone and beside a longer one. Padded to max_length, as the
    model was trained, it embeds the same either way, and as the model itself does."""
    alone = siglip.embed_texts(["a cat"])[0]
    together = siglip.embed_texts(["a cat", "a much longer description of a red sports car"])[0]
    np.testing.assert_allclose(alone, together, atol=1e-5)
    tokens = AutoTokenizer.from_pretrained(str(tiny_siglip))(
        ["a cat"], padding="max_length", max_length=64, return_tensors="pt"
    )
    model: Any = SiglipModel.from_pretrained(str(tiny_siglip))
    model.eval()
    with torch.inference_mode():
        output = model.get_text_features(input_ids=tokens["input_ids"])
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    np.testing.assert_allclose(
        alone, torch.nn.functional.normalize(features, dim=-1)[0].numpy(), atol=1e-5
    )


def test_the_family_comes_from_the_checkpoint_not_its_name(
    tiny_model: Path, tiny_siglip: Path, tmp_path: Path
) -> None:
    assert isinstance(open_embedder(str(tiny_model)), ClipEmbedder)
    assert isinstance(open_embedder(str(tiny_siglip)), SiglipEmbedder)
    misleading = tmp_path / "clip-vit-base"
    shutil.copytree(tiny_siglip, misleading)
    assert isinstance(open_embedder(str(misleading)), SiglipEmbedder)
    config = json.loads((misleading / "config.json").read_text())
    (misleading / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    with pytest.raises(UnsupportedModel, match="NaFlex"):
        open_embedder(str(misleading))


def test_the_fingerprint_is_the_weights_and_the_preprocessing(
    tiny_siglip: Path, tmp_path: Path
) -> None:
    same = open_embedder(str(tiny_siglip)).fingerprint
    assert open_embedder(str(tiny_siglip)).fingerprint == same  # loaded again: equal
    copy = tmp_path / "copy"
    shutil.copytree(tiny_siglip, copy)
    assert open_embedder(str(copy)).fingerprint == same  # another path, the same model
    other = write_tiny_siglip(tmp_path / "other", seed=1)
    assert open_embedder(str(other)).fingerprint != same
    processor = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(
        json.dumps({**processor, "image_mean": [0.4, 0.4, 0.4]})
    )
    assert open_embedder(str(copy)).fingerprint != same  # the same weights, other pixels


def test_a_frame_gets_one_crop_per_model_from_one_decode(
    tiny_model: Path, tiny_siglip: Path
) -> None:
    clip, siglip = preprocessing_of(str(tiny_model)), preprocessing_of(str(tiny_siglip))
    data = encode(textured(3, (640, 480)))
    signals = extract_signals(data, DecodeLimits.from_settings(TEST_SETTINGS), [clip, siglip])
    (frame,) = signals.frames
    assert [c.shape for c in frame.crops] == [clip.crop_shape, siglip.crop_shape]
    np.testing.assert_array_equal(signals.embedding_inputs(1)[0], siglip(Image.open(BytesIO(data))))


def test_a_siglip_checkpoint_with_a_sentencepiece_tokenizer_embeds_texts(
    tiny_siglip: Path, tmp_path: Path
) -> None:
    """Real SigLIP (v1) checkpoints ship a SentencePiece model (`spiece.model`) read by
    SiglipTokenizer, not a `tokenizer.json`: the tiny checkpoint given one such tokenizer,
    trained here on a few captions, embeds texts as the model itself does."""
    import sentencepiece
    from transformers import SiglipTokenizer

    checkpoint = tmp_path / "siglip-v1-like"
    shutil.copytree(tiny_siglip, checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (checkpoint / name).unlink(missing_ok=True)
    captions = ["a red sports car on a road", "a photo of a cat", "two dogs in the snow"]
    (tmp_path / "captions.txt").write_text("\n".join(captions * 50))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "captions.txt"),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=30,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    SiglipTokenizer(vocab_file=str(tmp_path / "spiece.model"), model_max_length=64).save_pretrained(
        checkpoint
    )
    assert (checkpoint / "spiece.model").exists()
    embedder = open_embedder(str(checkpoint))
    (ours,) = embedder.embed_texts(["a cat on a road"])
    tokens = SiglipTokenizer.from_pretrained(str(checkpoint))(
        ["a cat on a road"], padding="max_length", max_length=64, return_tensors="pt"
    )
    model: Any = SiglipModel.from_pretrained(str(checkpoint))
    model.eval()
    with torch.inference_mode():
        output = model.get_text_features(input_ids=tokens["input_ids"])
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    np.testing.assert_allclose(ours, torch.nn.functional.normalize(features, dim=-1)[0], atol=1e-5)
