"""The fuzz target's properties over its seed corpus, deterministically, in the normal run
(`.ci/fuzz` explores further from the same seeds for a bounded time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import fuzz_decode


@pytest.fixture(scope="module")
def warmed_up() -> None:
    fuzz_decode.warm_up()


# As in production, where Pillow's warnings about odd files are only logged.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("warmed_up")
def test_every_seed_keeps_the_fuzz_properties() -> None:
    seeds = fuzz_decode.hostile_seeds()
    assert len(seeds) > 100
    failures = []
    for number, data in enumerate(seeds):
        try:
            fuzz_decode.check(data)
        except fuzz_decode.FuzzFailure as failure:
            failures.append(f"seed {number}: {failure}")
    assert failures == []


@pytest.mark.usefixtures("warmed_up")
def test_the_properties_catch_what_they_are_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder bug that raises something else fails."""

    def broken(*args: object) -> None:
        raise IndexError("a decoder bug")

    monkeypatch.setattr("moderation.images.signals.extract_signals", broken)
    with pytest.raises(fuzz_decode.FuzzFailure, match="IndexError is not BadInput"):
        fuzz_decode.check(b"anything")


# In a fresh interpreter: a test process that freed a few hundred MiB earlier (another test
# in the same pytest-xdist process) keeps them resident, a new allocation reuses them, and
# RSS does not grow at all; the fuzzer itself runs in a process of its own.
_HOG = """
import sys
import moderation.images.signals as signals
from tests import fuzz_decode

def hog(*args):
    block = bytearray(fuzz_decode.RSS_ALLOWANCE + 2**20)
    block[::4096] = b"\\x01" * len(block[::4096])  # touch every page

signals.extract_signals = hog
try:
    fuzz_decode.check(b"anything")
except fuzz_decode.FuzzFailure as failure:
    print(failure)
    sys.exit(0)
sys.exit("a blown memory allowance went unnoticed")
"""


def test_a_blown_memory_allowance_fails() -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _HOG], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "peak RSS grew" in done.stdout
