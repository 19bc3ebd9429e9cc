"""Snapshots of a model's index on disk, each one file holding its own checkpoint.

A snapshot is one `.npz` per model under the index directory: the serialised Faiss index,
the embedding and upload id of every label, and a JSON header (model, kind, parameters,
checkpoint). It is written to a temporary file in the same directory, flushed to disk,
renamed over the old one and the directory flushed, so a reader (or a process restarted
after a crash) sees the old snapshot or the new one, whole, and never a snapshot whose
checkpoint claims rows its index lacks.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from moderation.errors import ModerationError
from moderation.search.indexes import IndexKind

FORMAT_VERSION = 1


class SnapshotUnreadable(ModerationError):
    code = "snapshot_unreadable"

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"index snapshot {path} cannot be read ({reason}); delete it or run "
            "`moderation index rebuild`"
        )


@dataclass
class Snapshot:
    model_id: int
    model_name: str
    dim: int
    kind: IndexKind
    parameters: dict[str, Any]
    # Every embedding row of the model with an id at or below this is in the index (or
    # was never committed); rows above it are in the index when their id is in
    # `embedding_ids`. See `follow.py`.
    checkpoint: int
    index: faiss.Index
    embedding_ids: np.ndarray  # int64, label -> embeddings.id
    upload_ids: np.ndarray  # int64, label -> uploads.id


def snapshot_path(directory: Path, model_id: int) -> Path:
    return directory / f"model-{model_id}.npz"


def write_snapshot(directory: Path, snapshot: Snapshot) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT_VERSION,
        "model_id": snapshot.model_id,
        "model_name": snapshot.model_name,
        "dim": snapshot.dim,
        "kind": snapshot.kind.value,
        "parameters": snapshot.parameters,
        "checkpoint": snapshot.checkpoint,
    }
    target = snapshot_path(directory, snapshot.model_id)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(
                out,
                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                index=faiss.serialize_index(snapshot.index),
                embedding_ids=snapshot.embedding_ids.astype(np.int64),
                upload_ids=snapshot.upload_ids.astype(np.int64),
            )
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)  # the rename itself survives a power cut
    finally:
        os.close(directory_fd)
    return target


def read_snapshot(directory: Path, model_id: int) -> Snapshot | None:
    """The model's snapshot, or None when there is none yet."""
    path = snapshot_path(directory, model_id)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes())
            if header.get("format") != FORMAT_VERSION:
                raise SnapshotUnreadable(path, f"format {header.get('format')!r}")
            return Snapshot(
                model_id=int(header["model_id"]),
                model_name=str(header["model_name"]),
                dim=int(header["dim"]),
                kind=IndexKind(header["kind"]),
                parameters=dict(header["parameters"]),
                checkpoint=int(header["checkpoint"]),
                index=faiss.deserialize_index(data["index"]),
                embedding_ids=np.array(data["embedding_ids"], dtype=np.int64),
                upload_ids=np.array(data["upload_ids"], dtype=np.int64),
            )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as error:
        raise SnapshotUnreadable(path, str(error)) from error
