"""Streaming JSONL: read lazily with line numbers, turn bad lines into errors, write with orjson.

Nothing here holds a whole file in memory: readers yield one line at a time, writers append and flush in
chunks. A bad line never stops a read; it comes back as a `BadLine` naming the file and the line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import orjson

MAX_LINE_BYTES = 10 * 1024 * 1024  # a line over 10 MB is an error, not a memory spike
_BOM = b"\xef\xbb\xbf"


class BadLine(msgspec.Struct, kw_only=True):
    """An input line that could not be used. `str()` reads `file:line: reason`; `code` is "line_too_long" or
    "bad_input"."""

    path: str
    line: int
    reason: str
    code: str = "bad_input"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class Line(msgspec.Struct, kw_only=True):
    line: int
    value: Any


def iter_jsonl(path: str | os.PathLike[str], max_line_bytes: int = MAX_LINE_BYTES,
               decode: Callable[[bytes], Any] = orjson.loads) -> Iterator[Line | BadLine]:
    """Yield each non-blank line of a JSONL file parsed, or a `BadLine` saying why it could not be.

    Lines are numbered from 1 as an editor shows them. An over-long line is skipped without being held in
    memory whole. A UTF-8 byte-order mark at the start of the file is ignored (editors on Windows write one).
    `decode` parses one line; it raises orjson.JSONDecodeError for a line that is not JSON.
    """
    name = str(path)
    # A line of the maximum length may come with a byte-order mark before it and a \r\n after it.
    limit = max_line_bytes + len(_BOM) + 2
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(limit)
            if not raw:
                return
            lineno += 1
            too_long = len(raw) == limit and not raw.endswith(b"\n")
            if too_long:
                while (more := fh.readline(1 << 20)) and not more.endswith(b"\n"):
                    pass  # swallow the rest of the long line in bounded pieces
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if too_long or len(raw) - (2 if raw.endswith(b"\r\n") else raw.endswith(b"\n")) > max_line_bytes:
                yield BadLine(path=name, line=lineno, reason=f"line longer than {max_line_bytes} bytes",
                              code="line_too_long")
                continue
            try:
                yield Line(line=lineno, value=decode(raw))
            except orjson.JSONDecodeError as exc:
                if not raw.strip():
                    continue  # blank lines are skipped (looked at only here: most lines are not blank)
                yield BadLine(path=name, line=lineno, reason=_why_not_json(raw, exc))


def _why_not_json(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:  # orjson's own message names surrogates and the wrong place
        return f"not valid UTF-8 text (byte {bad.start + 1} of the line)"
    return f"not valid JSON ({exc.msg}, at character {exc.pos + 1})"


_encoder = msgspec.json.Encoder()


def dumps_line(obj: Any) -> bytes:
    """One JSONL line (with newline) for a Struct, dict or list."""
    if isinstance(obj, msgspec.Struct):
        return _encoder.encode(obj) + b"\n"
    return orjson.dumps(obj) + b"\n"


class JsonlWriter:
    """Append JSONL lines to a file, buffering a little and flushing on close (and on `flush()`)."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "wb", buffer_lines: int = 256) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = open(self.path, mode)
        self._buf: list[bytes] = []
        self._limit = buffer_lines
        self.count = 0

    def write(self, obj: Any) -> None:
        self._buf.append(dumps_line(obj))
        self.count += 1
        if len(self._buf) >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._fh.write(b"".join(self._buf))
            self._buf.clear()
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
