"""The fuzz target's properties over its seed corpus, deterministically, in the normal run
(`.ci/fuzz` explores further from the same seeds for a bounded time)."""

from __future__ import annotations

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
    """A decoder bug that raises something else, and a blown memory allowance, fail."""

    def broken(*args: object) -> None:
        raise IndexError("a decoder bug")

    monkeypatch.setattr("moderation.images.signals.extract_signals", broken)
    with pytest.raises(fuzz_decode.FuzzFailure, match="IndexError is not BadInput"):
        fuzz_decode.check(b"anything")

    def hog(*args: object) -> None:
        # Well past the allowance: RSS moves by what other threads of a test process free
        # meanwhile too (a failure seen with 1 MiB over it, in a pytest-xdist process).
        block = bytearray(fuzz_decode.RSS_ALLOWANCE + 64 * 2**20)
        block[::4096] = b"\x01" * len(block[::4096])  # touch every page

    monkeypatch.setattr("moderation.images.signals.extract_signals", hog)
    with pytest.raises(fuzz_decode.FuzzFailure, match="peak RSS grew"):
        fuzz_decode.check(b"anything")
