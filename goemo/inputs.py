"""Texts to predict, read from `.txt` (one a line), `.jsonl` (a `text` field) or `.csv` (a `text` column).

Files are read line by line, never whole, so a file of any size streams in constant memory.
Every problem raises a GoemoError naming the file and line.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from goemo.errors import GoemoError

SUFFIXES = (".txt", ".jsonl", ".csv")


def check_file(path: Path) -> None:
    """Raise a GoemoError unless `path` is an existing file with a supported extension."""
    if path.suffix.lower() not in SUFFIXES:
        raise GoemoError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .txt (one text a line), .jsonl (a \"text\" field) or .csv (a \"text\" column)")
    if not path.is_file():
        raise GoemoError(f"{path}: no such file")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its newline) for each line; a byte-order mark on line 1 is dropped.

    Decoding each line separately is what lets a bad byte be reported with its line number.
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GoemoError(f"{path}:{number}: not valid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _txt(path: Path) -> Iterator[str]:
    # Every line is one text, empty lines included; lines end at LF, CRLF or a lone CR (as Python's universal
    # newlines); the final line end does not start another text.
    for number, line in _lines(path):
        if "\0" in line:  # UTF-16 without a byte-order mark ("h\0i\0") is valid UTF-8: texts of NUL-separated letters
            raise GoemoError(f"{path}:{number}: holds a NUL byte (UTF-16 or a binary file?); save the file as UTF-8")
        if line:  # empty only for a file that is just a byte-order mark: no text
            yield from line.removesuffix("\n").removesuffix("\r").split("\r")


def _jsonl(path: Path) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue  # blank lines hold no record
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GoemoError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than the stack
            raise GoemoError(f"{path}:{number}: JSON that Python cannot read ({str(e).split(':')[0]})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise GoemoError(f"{path}:{number}: each line must be a JSON object with a \"text\" field")
        text = record["text"]
        if not isinstance(text, str):
            raise GoemoError(f"{path}:{number}: \"text\" must be a string, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a \ud800-style escape of half a character: no tokenizer reads it
                raise GoemoError(f"{path}:{number}: \"text\" is not valid Unicode ({e.reason}; a lone \\u surrogate escape)") from None
        yield text


LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # the point after a CR that no LF follows


def _csv(path: Path) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)  # texts of any length (the csv module's default stops at 128 KiB)
    # Rows end at LF, CRLF or a lone CR, as .txt lines (and the csv module reading a file opened with newline='');
    # a lone CR inside a quoted field stays in its text. (A file of lone CRs alone is one "line" to _lines, read whole.)
    pieces = (piece for _, line in _lines(path) for piece in (LONE_CR.split(line) if "\r" in line else [line]) if piece)
    reader = csv.reader(pieces, strict=True)  # a stray or unclosed quote: an error, not rows lost
    try:
        header = next(reader, None)
        if header is None or "text" not in header:
            raise GoemoError(f"{path}:1: the header row has no \"text\" column (found: {', '.join(header or []) or 'nothing'})")
        if header.count("text") > 1:  # which one holds the texts is anyone's guess
            raise GoemoError(f"{path}:1: the header row has {header.count('text')} \"text\" columns; keep one (rename the others)")
        col = header.index("text")
        for row in reader:
            if not row:
                continue  # a blank line
            if col >= len(row):
                raise GoemoError(f"{path}:{reader.line_num}: {len(row)} columns, so no \"text\" value (column {col + 1})")
            yield row[col]
    except csv.Error as e:
        raise GoemoError(f"{path}:{reader.line_num}: bad CSV ({e})") from None


READERS = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}


def read_texts(path: Path) -> Iterator[str]:
    """The texts of a predict file, in file order, one at a time."""
    check_file(path)
    return READERS[path.suffix.lower()](path)


def count_texts(path: Path) -> int:
    """How many texts `path` holds; reads (and so validates) the whole file in constant memory."""
    return sum(1 for _ in read_texts(path))
