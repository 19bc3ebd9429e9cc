"""Tiny, randomly initialised CLIP and SigLIP checkpoints with tokenizer and processor,
written like real ones; and full-size architectures with random weights, for benchmarks.

They load through exactly the same `from_pretrained` path as a real checkpoint, which is
what tests and offline demos need. Their weights are random: two copies of the same image
embed to the same vector, but nothing else about their distances means anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

FAMILIES = ("clip", "siglip")

TINY_MODEL_WARNING = (
    "This is a model with random weights. Its matches mean nothing beyond exact copies "
    "of an image; use a real checkpoint (MODERATION_MODEL) for semantic near-duplicates."
)
IMAGE_SIZE = 64


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-character table of byte-level BPE (as used by GPT-2 and CLIP)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_tokenizer(directory: Path) -> CLIPTokenizer:
    # Single characters only and no merges: every word tokenises to its characters.
    characters = list(_bytes_to_unicode().values())
    tokens = [*characters, *(c + "</w>" for c in characters), "<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    # Loading the files (rather than constructing) works on transformers 4 and 5 alike.
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(directory)
    return tokenizer


# The text and vision towers of the tiny CLIP and the tiny SigLIP: small enough that tests
# load, embed and save them in milliseconds.
TINY_TOWERS: dict[str, dict[str, Any]] = {
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
    },
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 16,
    },
}

# Architectures with random weights. "tiny" is for tests; the full-size ones have the exact
# shapes of OpenAI's checkpoints, for benchmarks of speed where weights do not matter.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": {
        **TINY_TOWERS,
        "projection_dim": 32,
        # At the default scale a random ViT's output barely depends on its input, and every
        # image lands within 0.05 of every other; at 3x, unrelated images are 0.3-0.7 apart.
        "initializer_factor": 3.0,
    },
    "vit-b-32": {  # openai/clip-vit-base-patch32
        "text": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
        },
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        "projection_dim": 512,
        "initializer_factor": 1.0,
    },
    "vit-l-14-336": {  # openai/clip-vit-large-patch14-336
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
        },
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "image_size": 336,
            "patch_size": 14,
        },
        "projection_dim": 768,
        "initializer_factor": 1.0,
    },
}


def write_random_clip(directory: Path, architecture: str, *, seed: int = 0) -> Path:
    """Write a CLIP checkpoint with random weights: config, weights, tokenizer, processor."""
    # torch and transformers are imported where they are used: this module's constants are
    # read by the command line, which should start in well under a second.
    import torch
    from transformers import CLIPConfig, CLIPModel

    from moderation.embedding.clip import processor_class
    from moderation.embedding.embedder import quiet_transformers

    quiet_transformers()
    spec = ARCHITECTURES[architecture]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(directory)
    factor = spec["initializer_factor"]
    config = CLIPConfig(
        text_config={
            **spec["text"],
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "initializer_factor": factor,
        },
        vision_config={**spec["vision"], "initializer_factor": factor},
        projection_dim=spec["projection_dim"],
        initializer_factor=factor,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    side = spec["vision"]["image_size"]
    processor_class()(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(directory)
    (directory / "README.md").write_text(
        f"# Random CLIP ({architecture})\n\n{TINY_MODEL_WARNING}\n"
    )
    return directory


def write_tiny_clip(directory: Path, *, seed: int = 0) -> Path:
    return write_random_clip(directory, "tiny", seed=seed)


# SigLIP architectures with random weights. "tiny" is for tests; "vit-b-32-256" has the
# shapes of google/siglip2-base-patch32-256 (a SigLIP of about the size and cost of CLIP
# ViT-B/32), but a vocabulary of 32,000 tokens instead of Gemma's 256,000: the text table
# costs image embedding nothing and would add 750 MB to write and load.
SIGLIP_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": {
        **TINY_TOWERS,
    },
    "vit-b-32-256": {
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
        },
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": 256,
            "patch_size": 32,
        },
    },
}
SIGLIP_TEXT_TOKENS = 64
_SIGLIP_VOCAB = {"tiny": 0, "vit-b-32-256": 32_000}


def _write_siglip_tokenizer(directory: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges (every word tokenises to its characters) that
    appends `</s>` and pads with it, as SigLIP's does; as `tokenizer.json`, which needs no
    sentencepiece. `vocab_size` > 0 pads the vocabulary with unused tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    characters = list(_bytes_to_unicode().values())
    tokens = ["<pad>", "</s>", "<unk>", *characters]
    tokens += [f"<unused{i}>" for i in range(max(0, vocab_size - len(tokens)))]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=SIGLIP_TEXT_TOKENS,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_random_siglip(directory: Path, architecture: str, *, seed: int = 0) -> Path:
    """Write a SigLIP checkpoint with random weights: config, weights, tokenizer, processor."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    from moderation.embedding.embedder import quiet_transformers
    from moderation.embedding.siglip import SiglipEmbedder

    quiet_transformers()
    spec = SIGLIP_ARCHITECTURES[architecture]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_siglip_tokenizer(directory, _SIGLIP_VOCAB[architecture])
    config = SiglipConfig(
        text_config={
            **spec["text"],
            "vocab_size": len(tokenizer),
            "max_position_embeddings": SIGLIP_TEXT_TOKENS,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,  # SigLIP's texts have no start token
        },
        vision_config=spec["vision"],
    )
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(directory)
    side = spec["vision"]["image_size"]
    SiglipEmbedder._processor_class()(
        size={"height": side, "width": side},
        resample=3,  # bicubic, as the published checkpoints
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(directory)
    (directory / "README.md").write_text(
        f"# Random SigLIP ({architecture})\n\n{TINY_MODEL_WARNING}\n"
    )
    return directory


def write_tiny_siglip(directory: Path, *, seed: int = 0) -> Path:
    return write_random_siglip(directory, "tiny", seed=seed)


def write_tiny(directory: Path, family: str, *, seed: int = 0) -> Path:
    """The tiny checkpoint of a family (`FAMILIES`)."""
    if family == "siglip":
        return write_tiny_siglip(directory, seed=seed)
    return write_tiny_clip(directory, seed=seed)
