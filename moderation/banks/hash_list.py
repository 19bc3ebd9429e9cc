"""Reading PDQ hash lists as hash-sharing programs exchange them.

One hash per line, 64 hex digits, optionally with more columns. The shapes accepted are
those ThreatExchange's tools and Meta's PDQ hasher write:

- a bare hash: `f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22`
- a signal type, then the hash, then anything (ThreatExchange's signal files and
  `threatexchange dataset -P`): `pdq f8f8...9b22 'Sample Data' ...`
- the hash, then its quality 0-100, then anything (the PDQ photo hasher's
  `hash,quality,filename`): `f8f8...9b22,100,cat.jpg`
- CSV with a header naming the columns (`threatexchange dataset -P --csv`:
  `signal_type,signal_str,collab,category,tags`); the hash is in `signal_str` (or `hash`,
  or `pdq`), the type in `signal_type`, the quality in `quality`.

Columns are separated by commas, tabs or spaces (the first of those the line has, in that
order); quoted CSV fields may hold separators. Blank lines and lines starting with `#` are
skipped. Metadata columns are accepted and not stored: a bank holds signals only.
A line is rejected, with its number and why, when it names another signal type, its hash
is not 64 hex digits, or its quality is not 0-100.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from moderation.errors import Invalid
from moderation.images.hashing import PdqHash, parse_hex

# Signal type names other programs give PDQ.
PDQ_NAMES = frozenset({"pdq", "photo_pdq", "pdq_photo", "hash_pdq"})
HASH_COLUMNS = ("signal_str", "hash", "pdq", "signal")
# The longest line read: a hash with generous metadata.
MAX_LINE = 4096


class InvalidLine(Invalid):
    """A line of a hash list that is not a PDQ hash (reported with its number)."""

    code = "invalid_hash_line"


@dataclass(frozen=True)
class HashLine:
    line: int
    pdq: PdqHash


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str


@dataclass
class ParsedList:
    hashes: list[HashLine] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def parse_pdq_list(text: str) -> ParsedList:
    parsed = ParsedList()
    header: dict[str, int] | None = None
    seen_data = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE:
            parsed.rejected.append(Rejected(number, f"longer than {MAX_LINE} characters"))
            continue
        fields = _split(line)
        if not seen_data and header is None and _is_header(fields):
            header = {name.strip().lower(): i for i, name in enumerate(fields)}
            continue
        seen_data = True
        try:
            parsed.hashes.append(HashLine(number, _parse(fields, header)))
        except Invalid as error:
            parsed.rejected.append(Rejected(number, error.message))
    return parsed


def _split(line: str) -> list[str]:
    for delimiter in (",", "\t"):
        if delimiter in line:
            return [f.strip() for f in next(csv.reader([line], delimiter=delimiter))]
    return line.split()


def _is_header(fields: list[str]) -> bool:
    names = {f.strip().lower() for f in fields}
    return bool(names & set(HASH_COLUMNS)) and not any(_looks_like_hash(f) for f in fields)


def _looks_like_hash(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def _parse(fields: list[str], header: dict[str, int] | None) -> PdqHash:
    if header is not None:
        return _parse_columns(fields, header)
    first = fields[0]
    if not _looks_like_hash(first) and len(fields) > 1 and _is_type_name(first):
        _check_type(first)
        return PdqHash(parse_hex(fields[1], length=32, what="PDQ hash"), None)
    bits = parse_hex(first, length=32, what="PDQ hash")
    quality = _quality(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return PdqHash(bits, quality)


def _parse_columns(fields: list[str], header: dict[str, int]) -> PdqHash:
    def column(*names: str) -> str | None:
        for name in names:
            index = header.get(name)
            if index is not None and index < len(fields) and fields[index]:
                return fields[index]
        return None

    signal_type = column("signal_type", "type")
    if signal_type is not None:
        _check_type(signal_type)
    value = column(*HASH_COLUMNS)
    if value is None:
        raise InvalidLine("no hash in the column the header names")
    quality = column("quality")
    return PdqHash(
        parse_hex(value, length=32, what="PDQ hash"),
        _quality(quality) if quality is not None else None,
    )


def _is_type_name(value: str) -> bool:
    """A word that cannot be a (mistyped) hash: not hex, like `pdq` or `video_md5`."""
    hex_only = all(c in "0123456789abcdefABCDEF" for c in value)
    return not hex_only and value.replace("_", "").isalnum() and len(value) <= 32


def _check_type(name: str) -> None:
    if name.strip().lower() not in PDQ_NAMES:
        raise InvalidLine(f"signal type {name!r} is not PDQ; only PDQ hashes are imported")


def _quality(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 100:
        raise InvalidLine(f"PDQ quality must be an integer from 0 to 100, got {value!r}")
    return int(value)
