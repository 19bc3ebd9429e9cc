"""Whether a model checkpoint can load here, said at once and in one line.

A checkpoint is a local directory or a Hugging Face id. Where an id is neither cached nor
downloadable (a machine without the internet), `from_pretrained` spends most of a minute
retrying the hub (46 s measured here) before a long traceback; the service and the
command line need one line naming the setting and the way out instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import is_offline_mode, try_to_load_from_cache

from moderation.errors import Unavailable

_HUB = ("huggingface.co", 443)


class ModelUnavailable(Unavailable):
    code = "model_unavailable"

    def __init__(self, name: str, why: str) -> None:
        super().__init__(
            f"cannot load the embedding model {name!r} (MODERATION_MODEL): {why}; set "
            "MODERATION_MODEL to a checkpoint this host has (a directory or a Hugging Face "
            "id in its cache), or write a tiny random one to try the service with "
            "`moderation model tiny DIR`"
        )


def check_loadable(name: str, *, probe_timeout_s: float = 3.0) -> None:
    """Raise `ModelUnavailable` at once where `name` cannot load: not a directory, not in
    the Hugging Face cache, and the hub not reachable (one connection tried, within
    `probe_timeout_s`)."""
    if Path(name).expanduser().is_dir():
        return
    try:
        cached = try_to_load_from_cache(repo_id=name, filename="config.json")
    except ValueError:  # not a valid Hugging Face id either
        raise ModelUnavailable(name, "no such directory, and not a Hugging Face id") from None
    if isinstance(cached, str):
        return
    if _offline():
        raise ModelUnavailable(name, "not a directory, and not in the cache (HF_HUB_OFFLINE)")
    try:
        socket.create_connection(_HUB, timeout=probe_timeout_s).close()
    except OSError as error:
        raise ModelUnavailable(
            name, f"not a directory, not in the cache, and huggingface.co unreachable ({error})"
        ) from None


def _offline() -> bool:
    # Read now: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported.
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return is_offline_mode() or flag in {"1", "ON", "YES", "TRUE"}


@contextmanager
def loading(name: str) -> Iterator[None]:
    """Around `from_pretrained`: what it raises for a checkpoint it cannot read (missing
    files, a repository that does not exist) becomes one `ModelUnavailable`."""
    try:
        yield
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailable(name, first) from error
