"""A fuzzing net (Hypothesis): every reader of user files and `goemo.load(...).predict` either reads its input
correctly (round-trips what was written) or refuses it with goemo's one-line GoemoError; nothing else escapes.

Deterministic (`derandomize`: the same examples every run) and bounded in examples, so the suite stays fast.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goemo.data import read_labels, read_split
from goemo.errors import GoemoError
from goemo.inputs import read_texts

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any text that is valid Unicode (no lone surrogates: a UTF-8 file cannot hold them): control characters, NUL,
# BOMs, CR/LF, emoji, right-to-left marks, ...
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
HUGE = st.integers(100_000, 300_000).map(lambda n: "x" * n)  # a field far over any line length
LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
BOM = "\ufeff"


def refused_or(fn, *args):
    """fn(*args), or None when it raised a GoemoError whose message is one line naming the file."""
    try:
        return fn(*args)
    except GoemoError as e:
        assert "\n" not in str(e) and str(e)
        return None


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def csv_writer(buf: io.StringIO, crlf: bool, **kwargs):
    """A CSV writer whose files read back unambiguously: with LF line ends every field is quoted, since the
    minimal quoting quotes only the line terminator's characters and would leave a lone CR bare (a line end)."""
    if crlf:
        return csv.writer(buf, lineterminator="\r\n", **kwargs)
    return csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL, **kwargs)


# -- the TSV reader (train.tsv, dev.tsv, test.tsv) -------------------------------------------------------------
ROW = st.tuples(st.one_of(TEXT, HUGE), st.lists(st.integers(0, 27), min_size=1, max_size=5), st.text("abcdef0123456789", min_size=1, max_size=8))


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=8), bom=st.booleans(), crlf=st.booleans())
def test_tsv_round_trips(tmp_path, rows, bom, crlf):
    buf = io.StringIO()
    writer = csv_writer(buf, crlf, delimiter="\t")
    for text, ids, cid in rows:
        writer.writerow([text, ",".join(map(str, ids)), cid])
    path = write(tmp_path, "train.tsv", ((BOM if bom else "") + buf.getvalue()).encode("utf-8"))
    got = refused_or(read_split, path, 28)
    # A first text that starts with a BOM character loses it: it reads as the file's byte-order mark.
    if got is None:
        pytest.fail(f"a well-formed split was refused: {rows!r}")
    want_text = [t for t, _, _ in rows]
    if want_text[0].startswith(BOM) and not bom:
        want_text[0] = want_text[0][1:]
    assert got == {"text": want_text, "labels": [ids for _, ids, _ in rows], "id": [c for _, _, c in rows]}


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), TEXT.map(lambda t: t.encode("utf-8"))))
def test_tsv_of_any_bytes_is_read_or_refused(tmp_path, data):
    got = refused_or(read_split, write(tmp_path, "dev.tsv", data), 28)
    if got is not None:
        assert len(got["text"]) == len(got["labels"]) == len(got["id"]) > 0
        assert all(1 <= len(ids) and all(0 <= i < 28 for i in ids) for ids in got["labels"])


# -- labels.txt ----------------------------------------------------------------------------------------------------
# A label name: no leading/trailing whitespace and no character that str.splitlines treats as a line break.
NAME = st.text(st.characters(exclude_categories=["Cs", "Zl", "Zp", "Cc"], exclude_characters="\x85"), min_size=1, max_size=12).filter(
    lambda s: s == s.strip() and not s.startswith(BOM)
)


@FUZZ
@given(names=st.lists(NAME, min_size=1, max_size=30, unique=True), end=LINE_ENDS, bom=st.booleans())
def test_labels_round_trip(tmp_path, names, end, bom):
    data = (BOM if bom else "") + end.join(names) + end
    assert read_labels(write(tmp_path, "labels.txt", data.encode("utf-8"))) == names


@FUZZ
@given(data=st.binary(max_size=200))
def test_labels_of_any_bytes_are_read_or_refused(tmp_path, data):
    got = refused_or(read_labels, write(tmp_path, "labels.txt", data))
    if got is not None:
        assert got and all(got) and len(set(got)) == len(got)


# -- predict files: .txt, .jsonl, .csv -------------------------------------------------------------------------
def read_all(path: Path) -> list[str]:
    return list(read_texts(path))


# .txt holds one text a line, so its texts have no line breaks (LF, CR), nor NUL (refused: UTF-16 read as UTF-8).
TXT_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00"), max_size=40)


@FUZZ
@given(texts=st.lists(st.one_of(TXT_TEXT, HUGE), max_size=8), ends=st.lists(LINE_ENDS, min_size=8, max_size=8), bom=st.booleans())
def test_txt_round_trips_with_any_line_ends(tmp_path, texts, ends, bom):
    body = "".join(t + e for t, e in zip(texts, ends))
    got = read_all(write(tmp_path, "in.txt", ((BOM if bom else "") + body).encode("utf-8")))
    # The reference: Python's universal newlines (a CR line end followed by an empty text's LF reads as one CRLF).
    universal = io.StringIO(body.removeprefix("" if bom else BOM), newline=None).read()
    assert got == (universal.split("\n")[:-1] if universal else [])
    pairs = list(zip(texts, ends))
    ambiguous = any(e == "\r" and not t2 and e2.startswith("\n") for (_, e), (t2, e2) in zip(pairs, pairs[1:]))
    if not ambiguous:  # no such CR + LF pair: every text comes back as it was
        assert got == [t.removeprefix("" if bom else BOM) if i == 0 else t for i, t in enumerate(texts)]


@FUZZ
@given(texts=st.lists(st.one_of(TEXT, HUGE), max_size=8), ascii_only=st.booleans(), blank=st.booleans())
def test_jsonl_round_trips(tmp_path, texts, ascii_only, blank):
    lines = [json.dumps({"text": t, "n": i}, ensure_ascii=ascii_only) for i, t in enumerate(texts)]
    data = ("\n\n" if blank else "\n").join(lines) + "\n"
    assert read_all(write(tmp_path, "in.jsonl", data.encode("utf-8"))) == texts


@FUZZ
@given(value=st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2), st.just("\\ud800"), st.just("a\\udfffb")))
def test_jsonl_wrong_types_and_lone_surrogates_are_refused(tmp_path, value):
    raw = f'{{"text": "{value}"}}' if isinstance(value, str) else json.dumps({"text": value})
    with pytest.raises(GoemoError, match=r"in\.jsonl:1: "):
        read_all(write(tmp_path, "in.jsonl", raw.encode("utf-8") + b"\n"))


@FUZZ
@given(texts=st.lists(st.one_of(TEXT, HUGE), max_size=8), end=st.sampled_from(["\n", "\r\n", "\r"]))
def test_csv_round_trips(tmp_path, texts, end):
    buf = io.StringIO()  # rows ending in a lone CR (classic Mac): every field quoted, as with LF
    writer = csv_writer(buf, end == "\r\n") if end != "\r" else csv.writer(buf, lineterminator="\r", quoting=csv.QUOTE_ALL)
    writer.writerow(["id", "text"])
    writer.writerows([i, t] for i, t in enumerate(texts))
    assert read_all(write(tmp_path, "in.csv", buf.getvalue().encode("utf-8"))) == texts


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".jsonl", ".csv"]))
def test_predict_file_of_any_bytes_is_read_or_refused(tmp_path, data, suffix):
    got = refused_or(read_all, write(tmp_path, "in" + suffix, data))
    if got is not None:
        assert all(isinstance(t, str) for t in got)


# -- goemo.load(...).predict arguments -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clf(tiny_run):
    from goemo import load

    return load(tiny_run / "lightning_logs" / "version_0")


ANY_ITEM = st.one_of(TEXT, st.integers(), st.none(), st.binary(max_size=5), st.just("lone \ud800"), st.floats(), st.lists(TEXT, max_size=2))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(ANY_ITEM, max_size=6), wrap=st.sampled_from(["list", "tuple", "iter", "gen"]))
def test_predict_arguments_are_predicted_or_refused(clf, items, wrap):
    arg = {"list": list, "tuple": tuple, "iter": iter, "gen": lambda xs: (x for x in xs)}[wrap](items)
    got = refused_or(clf.predict, arg)
    if got is None:
        assert not all(isinstance(t, str) and t.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == t for t in items)
    else:
        assert [r["text"] for r in got] == items  # one record per text, in input order
        assert all(set(r["scores"]) == set(clf.label_names) for r in got)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arg=st.one_of(TEXT, st.integers(), st.none(), st.binary(max_size=5), st.dictionaries(TEXT, TEXT, max_size=2)))
def test_predict_non_iterables_single_strings_and_dicts_are_refused(clf, arg):
    """Dicts too: one iterates over its keys, which were predicted silently."""
    with pytest.raises(GoemoError):
        clf.predict(arg)
