"""io.iter_jsonl, the one reader of every JSONL input: line numbers, lengths, byte-order marks, blank lines."""

from __future__ import annotations

from pathlib import Path

from tcia_async.io import Line, iter_jsonl

MAX = 100


def read(tmp_path: Path, data: bytes) -> list[tuple[int, str]]:
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    return [(x.line, "ok" if isinstance(x, Line) else f"{x.code}: {x.reason}") for x in iter_jsonl(path, MAX)]


def string_line(content_bytes: int, end: bytes = b"\n") -> bytes:
    return b'"' + b"a" * (content_bytes - 2) + b'"' + end  # a JSON string of exactly `content_bytes` bytes


def test_a_long_first_line_after_a_byte_order_mark_is_one_bad_line_and_later_numbers_hold(tmp_path):
    got = read(tmp_path, b"\xef\xbb\xbf" + string_line(MAX + 5) + b'{"x": 1}\nnot json\n{"y": 2}\n')
    assert [n for n, _ in got] == [1, 2, 3, 4]
    assert got[0][1].startswith("line_too_long") and got[1][1] == "ok" and got[3][1] == "ok"
    assert got[2][1].startswith("bad_input: not valid JSON")


def test_the_length_limit_counts_the_line_without_its_ending_or_mark(tmp_path):
    for ending in (b"\n", b"\r\n", b""):
        assert read(tmp_path, string_line(MAX, ending)) == [(1, "ok")]
        assert read(tmp_path, b"\xef\xbb\xbf" + string_line(MAX, ending)) == [(1, "ok")]
        got = read(tmp_path, string_line(MAX + 1, ending) + (b'{"next": true}\n' if ending else b""))
        assert got[0][0] == 1 and got[0][1].startswith("line_too_long")
        assert got[1:] == ([(2, "ok")] if ending else [])


def test_blank_lines_are_skipped_and_invalid_utf8_is_named(tmp_path):
    got = read(tmp_path, b"\n  \n\r\n{}\n" + b'{"a": "\xff"}\n')
    assert got == [(4, "ok"), (5, "bad_input: not valid UTF-8 text (byte 8 of the line)")]
    assert read(tmp_path, b"\xef\xbb\xbf") == []  # a file holding only the mark has no lines
