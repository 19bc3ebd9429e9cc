"""The canvas a GIF will need, read from its frame descriptors before Pillow decodes any.

Pillow grows a GIF's canvas when a frame is drawn past it, and it allocates the grown
canvas while it *seeks* to that frame: a 4.8 KB file with a 1x1 screen and a frame at
13107x13311 took 666 MiB inside `seek` (found by .ci/fuzz), before any check on the
frame's size could run. So the frame descriptors are walked here, in the bytes, first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

_HEADER = 6
_SCREEN = 7
_EXTENSION = 0x21
_IMAGE = 0x2C
_TRAILER = 0x3B


def grown_canvases(data: bytes, frames: int) -> Iterator[tuple[int, tuple[int, int]]]:
    """(frame index, canvas size after drawing that frame) for the first `frames` frames,
    as Pillow grows it: each side the largest of the screen's and every frame's extent so
    far. Walks the blocks as Pillow does (unknown bytes skipped); stops quietly where the
    data ends, and decoding reports what is malformed."""
    if len(data) < _HEADER + _SCREEN or not data.startswith((b"GIF87a", b"GIF89a")):
        return
    width, height, flags = struct.unpack_from("<HHB", data, _HEADER)
    at = _HEADER + _SCREEN + _color_table_size(flags)
    index = 0
    while index < frames and at < len(data):
        block = data[at]
        if block == _TRAILER:
            return
        if block == _EXTENSION:
            at = _skip_sub_blocks(data, at + 2)
        elif block == _IMAGE:
            if at + 10 > len(data):
                return
            left, top, frame_width, frame_height, frame_flags = struct.unpack_from(
                "<HHHHB", data, at + 1
            )
            width = max(width, left + frame_width)
            height = max(height, top + frame_height)
            yield index, (width, height)
            index += 1
            # The descriptor, its colour table, the LZW code size, then the data.
            at = _skip_sub_blocks(data, at + 10 + _color_table_size(frame_flags) + 1)
        else:
            # Pillow skips a byte it does not know, one at a time, and reads on.
            at += 1


def _color_table_size(flags: int) -> int:
    return 3 * (2 ** ((flags & 0x07) + 1)) if flags & 0x80 else 0


def _skip_sub_blocks(data: bytes, at: int) -> int:
    """The position after a chain of sub-blocks (each a length byte, then that many bytes,
    ended by a zero length); past the end when the chain is cut short."""
    while at < len(data):
        length = data[at]
        at += 1 + length
        if length == 0:
            return at
    return len(data)
