"""The data pipeline's readers, on real files: formats, compressions, expansion, bad input."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import sysconfig
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.config import InputConfig
from data_pipeline.readers import (
    InputError,
    ReadStats,
    Span,
    expand_input,
    infer_format,
    parquet_row_group_sizes,
    read_records,
    splittable,
    stdlib_corpus_files,
)
from data_pipeline.records import Document, Malformed, Record


def read(file: str | Path, **spec: object) -> list[Record]:
    return list(read_records(str(file), InputConfig(path=str(file), **spec)))


def documents(records: list[Record]) -> list[Document]:
    return [r for r in records if isinstance(r, Document)]


def malformed(records: list[Record]) -> list[tuple[str, str]]:
    return [(r.location, r.reason) for r in records if isinstance(r, Malformed)]


def jsonl(texts: list[str]) -> bytes:
    return b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def zstd(data: bytes, **options: object) -> bytes:
    return zstandard.ZstdCompressor(**options).compress(data)


def parquet(path: Path, columns: dict[str, pa.Array | list], **options: object) -> Path:
    pq.write_table(pa.table(columns), path, **options)
    return path


TEXTS = [f"document number {i}: some words" for i in range(5)]


# --- formats and compressions


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("a.jsonl.gz", "jsonl"),
        ("a.jsonl.zst", "jsonl"),
        ("a.json.gz", "jsonl"),
        ("dir/A.JSON.ZST", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.txt", "text"),
        ("a.txt.gz", "text"),
        ("a.txt.zst", "text"),
        ("a.py", "text"),
        ("a.md", "text"),
        ("s3://bucket/x/a.jsonl.gz", "jsonl"),
    ],
)
def test_infer_format(name: str, fmt: str) -> None:
    assert infer_format(name) == fmt


@pytest.mark.parametrize("name", ["a.json", "a.csv", "part-00000", "a.parquet.gz", "a.gz"])
def test_infer_format_unknown(name: str) -> None:
    with pytest.raises(InputError) as error:
        infer_format(name)
    assert str(error.value).startswith(f"{name}: cannot tell the format")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("a.jsonl", lambda b: b),
        ("a.jsonl.gz", gzip.compress),
        ("a.json.gz", gzip.compress),
        ("a.jsonl.zst", zstd),
    ],
)
def test_jsonl(tmp_path: Path, name: str, compress) -> None:
    file = write(tmp_path / name, compress(jsonl(TEXTS)))
    records = read(file)
    assert records == [Document(str(file), f"line {i + 1}", t) for i, t in enumerate(TEXTS)]


def test_jsonl_multi_frame_zstd_and_multi_member_gzip(tmp_path: Path) -> None:
    halves = jsonl(TEXTS[:2]), jsonl(TEXTS[2:])
    zst = write(tmp_path / "a.jsonl.zst", zstd(halves[0]) + zstd(halves[1], write_checksum=True))
    gz = write(tmp_path / "a.jsonl.gz", gzip.compress(halves[0]) + gzip.compress(halves[1]))
    for file in (zst, gz):
        assert [d.text for d in documents(read(file))] == TEXTS


def test_jsonl_large_streamed_zstd(tmp_path: Path) -> None:
    texts = [f"row {i} " + "x" * (i % 300) for i in range(20_000)]
    file = write(tmp_path / "big.jsonl.zst", zstd(jsonl(texts), level=1))
    assert [d.text for d in documents(read(file))] == texts


def test_jsonl_other_field_blank_lines_crlf_bom_and_no_final_newline(tmp_path: Path) -> None:
    data = (
        b'\xef\xbb\xbf{"body": "one"}\r\n\r\n   \n{"body": "two", "text": 3}\n\n{"body": "three"}'
    )
    file = write(tmp_path / "a.jsonl", data)
    assert read(file, text_field="body") == [
        Document(str(file), "line 1", "one"),
        Document(str(file), "line 4", "two"),
        Document(str(file), "line 6", "three"),
    ]


def test_parquet(tmp_path: Path) -> None:
    texts = [f"text {i}" for i in range(600)]
    file = parquet(tmp_path / "a.parquet", {"id": list(range(600)), "text": texts})
    records = read(file)
    assert records == [Document(str(file), f"row {i}", t) for i, t in enumerate(texts)]


def test_parquet_many_row_groups_and_other_field(tmp_path: Path) -> None:
    texts = [f"text {i}" for i in range(1000)]
    file = parquet(tmp_path / "a.parquet", {"content": texts}, row_group_size=128)
    assert [d.text for d in documents(read(file, text_field="content"))] == texts
    assert read(file, text_field="content")[999].location == "row 999"


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("a.txt", lambda b: b),
        ("a.md", lambda b: b),
        ("a.txt.gz", gzip.compress),
        ("a.txt.zst", zstd),
    ],
)
def test_text_document(tmp_path: Path, name: str, compress) -> None:
    text = "First line\r\n\nSecond line, exactly as written  \n\n"
    file = write(tmp_path / name, compress(text.encode()))
    assert read(file) == [Document(str(file), "file", text)]


def test_text_per_line(tmp_path: Path) -> None:
    file = write(tmp_path / "a.txt.gz", gzip.compress(b"alpha\r\n\n  \nbeta  \ngamma"))
    assert read(file, text_mode="line") == [
        Document(str(file), "line 1", "alpha"),
        Document(str(file), "line 4", "beta  "),
        Document(str(file), "line 5", "gamma"),
    ]


def test_text_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    file = write(tmp_path / "a.txt", b"\xef\xbb\xbfhello\nworld\n")
    assert read(file) == [Document(str(file), "file", "hello\nworld\n")]
    assert [d.text for d in documents(read(file, text_mode="line"))] == ["hello", "world"]


def test_explicit_format_overrides_the_name(tmp_path: Path) -> None:
    file = write(tmp_path / "part-00000", jsonl(TEXTS))
    assert len(documents(read(file, format="jsonl"))) == 5
    with pytest.raises(InputError, match="cannot tell the format"):
        read_records(str(file), InputConfig(path=str(file)))


def test_fifty_megabyte_single_line_document(tmp_path: Path) -> None:
    text = "word " * 10_000_000
    file = write(tmp_path / "big.jsonl", json.dumps({"text": text}).encode())  # no final \n
    (record,) = read(file)
    assert record == Document(str(file), "line 1", text)


# --- expanding inputs


def make_tree(root: Path) -> None:
    for name in [
        "b.jsonl",
        "a.jsonl.gz",
        "sub/deeper/c.parquet",
        "sub/d.txt.zst",
        "sub/e.py",
        "notes.csv",
        "_SUCCESS",
        ".hidden.jsonl",
        ".git/f.jsonl",
        "sub/.cache/g.txt",
    ]:
        write(root / name, b"x")


def test_expand_directory_recursive_sorted_hidden_skipped(tmp_path: Path) -> None:
    make_tree(tmp_path)
    expected = ["a.jsonl.gz", "b.jsonl", "sub/d.txt.zst", "sub/deeper/c.parquet", "sub/e.py"]
    assert expand_input(str(tmp_path)) == [str(tmp_path / n) for n in expected]


def test_expand_file_and_globs(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert expand_input(str(tmp_path / "notes.csv")) == [str(tmp_path / "notes.csv")]
    assert expand_input(str(tmp_path / "*.jsonl*")) == [
        str(tmp_path / "a.jsonl.gz"),
        str(tmp_path / "b.jsonl"),
    ]
    assert expand_input(str(tmp_path / "**" / "*.txt*")) == [str(tmp_path / "sub/d.txt.zst")]
    everything = ["_SUCCESS", "a.jsonl.gz", "b.jsonl", "notes.csv", "sub/d.txt.zst"]
    everything += ["sub/deeper/c.parquet", "sub/e.py"]
    assert expand_input(str(tmp_path / "**")) == [str(tmp_path / n) for n in everything]


def test_memory_urls(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/kiln-test-{os.getpid()}-{tmp_path.name}"
    fs.pipe(f"{root}/b.jsonl", jsonl(TEXTS))
    fs.pipe(f"{root}/sub/a.jsonl.gz", gzip.compress(jsonl(TEXTS[:2])))
    fs.pipe(f"{root}/sub/c.txt.zst", zstd(b"plain text"))
    fs.pipe(f"{root}/.hidden/d.jsonl", jsonl(TEXTS))
    fs.pipe(f"{root}/notes.csv", b"x")
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": TEXTS}), buffer)
    fs.pipe(f"{root}/e.parquet", buffer.getvalue().to_pybytes())
    try:
        names = ["b.jsonl", "e.parquet", "sub/a.jsonl.gz", "sub/c.txt.zst"]
        files = expand_input(f"memory://{root}")
        assert files == [f"memory://{root}/{n}" for n in names]
        assert expand_input(f"memory://{root}/**/*.jsonl*") == [files[0], files[2]]
        assert expand_input(f"memory://{root}/b.jsonl") == [files[0]]
        counts = [len(documents(read(f))) for f in files]
        assert counts == [5, 5, 2, 1]
        assert read(files[3])[0] == Document(files[3], "file", "plain text")
        with pytest.raises(InputError, match="the glob matches no file"):
            expand_input(f"memory://{root}/*.zst")
    finally:
        fs.rm(root, recursive=True)


def test_file_url(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", jsonl(TEXTS))
    (file,) = expand_input(f"file://{tmp_path}")
    assert file == f"file://{tmp_path}/a.jsonl"
    assert len(documents(read(file))) == 5


def test_stdlib_corpus() -> None:
    files = expand_input("stdlib://")
    assert files == stdlib_corpus_files() == sorted(files)
    assert len(files) > 500
    assert sum(os.path.getsize(f) for f in files) > 10_000_000
    assert not any("site-packages" in f or "__pycache__" in f for f in files)
    assert all(f.endswith(".py") for f in files)
    records = [r for f in files for r in read(f)]
    assert len(documents(records)) > 500
    assert all(isinstance(r, Document | Malformed) for r in records)
    os_module = os.path.join(sysconfig.get_paths()["stdlib"], "os.py")
    (record,) = read(files[files.index(os_module)])
    assert isinstance(record, Document) and "def makedirs" in record.text


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: str(p / "missing.jsonl"), "no such file or directory"),
        (lambda p: str(p / "nothing" / "*.jsonl"), "the glob matches no file"),
        (lambda p: str(p / "**" / "*.zst"), "the glob matches no file"),
        (lambda p: str(p), "the directory holds no file of a known format"),
        (lambda p: "memory:///kiln-missing/x.jsonl", "no such file or directory"),
        (lambda p: "nope://bucket/x.jsonl", "unknown URL protocol nope://"),
        (lambda p: "stdlib://json", "give stdlib:// alone"),
    ],
)
def test_input_errors(tmp_path: Path, make, problem: str) -> None:
    write(tmp_path / "notes.csv", b"x")
    write(tmp_path / ".hidden.jsonl", b"x")
    path = make(tmp_path)
    with pytest.raises(InputError) as error:
        expand_input(path)
    assert str(error.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_input_error_missing_filesystem_package() -> None:
    with pytest.raises(InputError) as error:
        expand_input("s3://bucket/data/*.jsonl")
    message = "s3://bucket/data/*.jsonl: reading s3:// needs the s3fs package (pip install s3fs)"
    assert str(error.value) == message


def test_input_error_is_one_line_and_picklable() -> None:
    error = InputError("data/x.jsonl", "first\nsecond")
    assert str(error) == "data/x.jsonl: first second"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.problem) == (str(error), error.path, error.problem)
    whole = InputError("data.inputs: no input given\n")
    assert str(whole) == str(pickle.loads(pickle.dumps(whole))) == "data.inputs: no input given"


# --- bad content: every bad record becomes a Malformed, the good ones are all read


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    lines = [
        b'{"text": "good 1"}',
        b'{"text": "unterminated',
        b'["text", "an array"]',
        b'"just a string"',
        b'{"body": "no text field"}',
        b'{"text": null}',
        b'{"text": 42}',
        b'{"text": ["a"]}',
        b'{"text": ""}',
        b'{"text": " \\n\\t "}',
        b'{"text": "bad \xff\xfe bytes"}',
        b'{"text": "nul \\u0000 inside"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b"[" * 100_000,
        b"",
        b'{"text": "good 2"}',
    ]
    file = write(tmp_path / "a.jsonl", b"\n".join(lines) + b"\n")
    records = read(file)
    assert [(d.location, d.text) for d in documents(records)] == [
        ("line 1", "good 1"),
        ("line 16", "good 2"),
    ]
    assert malformed(records) == [
        ("line 2", "invalid JSON: Unterminated string starting at at column 10"),
        ("line 3", "the JSON value is an array, not an object"),
        ("line 4", "the JSON value is a string, not an object"),
        ("line 5", "missing field 'text'"),
        ("line 6", "field 'text' is null"),
        ("line 7", "field 'text' is a number, not a string"),
        ("line 8", "field 'text' is an array, not a string"),
        ("line 9", "field 'text' is empty or whitespace-only"),
        ("line 10", "field 'text' is empty or whitespace-only"),
        ("line 11", "invalid UTF-8 at byte 14: invalid start byte"),
        ("line 12", "field 'text' holds a NUL byte"),
        ("line 13", "field 'text' holds a lone surrogate (invalid Unicode)"),
        ("line 14", "invalid JSON: nested too deeply"),
    ]
    bad = [r for r in records if isinstance(r, Malformed)]
    assert all(r.source == str(file) for r in bad)
    assert bad[0].preview == '{"text": "unterminated'
    assert bad[9].preview == '{"text": "bad \ufffd\ufffd bytes"}'
    assert len(bad[12].preview) == 200


def test_text_lines_bad(tmp_path: Path) -> None:
    file = write(tmp_path / "a.txt", b"good one\nbad \xc3\x28 utf8\nnul \x00 here\n\ngood two\n")
    records = read(file, text_mode="line")
    assert [(d.location, d.text) for d in documents(records)] == [
        ("line 1", "good one"),
        ("line 5", "good two"),
    ]
    assert malformed(records) == [
        ("line 2", "invalid UTF-8 at byte 4: invalid continuation byte"),
        ("line 3", "the text holds a NUL byte"),
    ]


def test_text_documents_bad(tmp_path: Path) -> None:
    bad_utf8 = write(tmp_path / "a.txt", b"fine start " * 30 + b"\xff end")
    nul = write(tmp_path / "b.md", b"text\x00more")
    for file, reason in [
        (bad_utf8, "invalid UTF-8 at byte 330: invalid start byte"),
        (nul, "the text holds a NUL byte"),
    ]:
        (record,) = read(file)
        assert (record.location, record.reason) == ("file", reason)
    assert read(bad_utf8)[0].preview == ("fine start " * 30)[:200]


@pytest.mark.parametrize(
    ("name", "data", "spec"),
    [
        ("a.jsonl", b"", {}),
        ("b.jsonl", b"\n  \n\r\n\n", {}),
        ("c.jsonl.gz", gzip.compress(b""), {}),
        ("d.jsonl.zst", zstd(b"\n\n"), {}),
        ("e.txt", b"", {}),
        ("f.txt", b" \n\t\n", {}),
        ("g.txt.gz", gzip.compress(b"\n\n"), {}),
        ("h.txt", b"", {"text_mode": "line"}),
        ("i.txt", b"\n \n", {"text_mode": "line"}),
        ("j.parquet", b"", {}),
    ],
)
def test_empty_files(tmp_path: Path, name: str, data: bytes, spec: dict) -> None:
    file = write(tmp_path / name, data)
    assert malformed(read(file, **spec)) == [("file", "empty file")]
    assert len(read(file, **spec)) == 1


def test_empty_parquet_table(tmp_path: Path) -> None:
    file = parquet(tmp_path / "a.parquet", {"text": pa.array([], pa.string())})
    assert malformed(read(file)) == [("file", "empty file")]


def complete_lines(decompressed_prefix: bytes) -> int:
    return decompressed_prefix.count(b"\n")


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(jsonl([f"document {i} " * 20 for i in range(2000)]))
    truncated = data[: len(data) // 2]
    prefix = zlib.decompressobj(wbits=31).decompress(truncated)
    n = complete_lines(prefix)
    assert 100 < n < 2000
    file = write(tmp_path / "a.jsonl.gz", truncated)
    records = read(file)
    assert len(records) == n + 1 and len(documents(records)) == n
    last = records[-1]
    assert isinstance(last, Malformed) and last.location == f"line {n + 1}"
    assert last.reason.startswith("truncated gzip stream: Compressed file ended")
    assert last.preview == prefix[prefix.rindex(b"\n") + 1 :][:200].decode()


def test_truncated_zstd(tmp_path: Path) -> None:
    texts = [hashlib.sha256(str(i).encode()).hexdigest() * 3 for i in range(8000)]
    data = zstd(jsonl(texts[:4000])) + zstd(jsonl(texts[4000:]), write_checksum=True)
    truncated = data[: len(data) * 3 // 4]
    first = zstandard.ZstdDecompressor().decompressobj()
    prefix = first.decompress(truncated)
    rest = zstandard.ZstdDecompressor().decompressobj().decompress(first.unused_data)
    n = complete_lines(prefix + rest)
    assert 4000 < n < 8000
    file = write(tmp_path / "a.jsonl.zst", truncated)
    records = read(file)
    assert len(records) == n + 1 and len(documents(records)) == n
    assert malformed(records) == [
        (f"line {n + 1}", "truncated zstd stream: the stream ends inside a zstd frame")
    ]


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("a.jsonl.gz", b"not gzip at all\n", "corrupt gzip stream: Not a gzipped file"),
        ("b.jsonl.zst", b"not zstd at all\n", "corrupt zstd stream: zstd decompressor error"),
        ("c.txt.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 40, "corrupt gzip stream:"),
    ],
)
def test_corrupt_compressed_streams(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    file = write(tmp_path / name, data)
    for mode in ("document", "line"):
        (record,) = read(file, text_mode=mode)
        assert isinstance(record, Malformed) and record.reason.startswith(reason)
        expected = "file" if name.endswith(".txt.gz") and mode == "document" else "line 1"
        assert record.location == expected


def test_corrupt_zstd_after_good_records(tmp_path: Path) -> None:
    file = write(tmp_path / "a.jsonl.zst", zstd(jsonl(TEXTS)) + b"garbage after the frame")
    records = read(file)
    assert len(documents(records)) == 5
    assert malformed(records) == [
        ("line 6", "corrupt zstd stream: zstd decompressor error: Unknown frame descriptor")
    ]


def test_truncated_text_document(tmp_path: Path) -> None:
    data = gzip.compress(b"some words " * 10_000)
    file = write(tmp_path / "a.txt.gz", data[: len(data) - 10])
    (record,) = read(file)
    assert (record.location, record.reason.split(":")[0]) == ("file", "truncated gzip stream")


@pytest.mark.parametrize("spec", [{}, {"text_mode": "line"}, {"format": "jsonl"}])
def test_unreadable_files(tmp_path: Path, spec: dict) -> None:
    directory = tmp_path / "dir.txt"
    directory.mkdir()
    vanished = tmp_path / "gone.txt"
    for file, errno_text in [(directory, "Is a directory"), (vanished, "No such file")]:
        (record,) = read(file, **spec)
        assert isinstance(record, Malformed) and record.location == "file"
        assert record.reason.startswith("unreadable file: ") and errno_text in record.reason


def test_parquet_bad_files(tmp_path: Path) -> None:
    garbage = write(tmp_path / "a.parquet", b"PAR1 this is not parquet" * 10)
    (record,) = read(garbage)
    assert record.location == "file" and record.reason.startswith("unreadable Parquet file: ")

    good = parquet(tmp_path / "b.parquet", {"text": TEXTS})
    truncated = write(tmp_path / "c.parquet", good.read_bytes()[:-20])
    (record,) = read(truncated)
    assert record.location == "file" and record.reason.startswith("unreadable Parquet file: ")

    other = parquet(tmp_path / "d.parquet", {"id": [1], "body": ["x"]})
    assert malformed(read(other)) == [("file", "no column 'text'; the columns are 'id', 'body'")]


def test_parquet_bad_rows(tmp_path: Path) -> None:
    strings = pa.array([b"good 0", None, b"", b"  \n", b"bad \xff", b"nul \x00", b"good 6"])
    file = parquet(tmp_path / "a.parquet", {"text": strings.cast(pa.binary()).view(pa.string())})
    records = read(file)
    assert [(d.location, d.text) for d in documents(records)] == [
        ("row 0", "good 0"),
        ("row 6", "good 6"),
    ]
    assert malformed(records) == [
        ("row 1", "column 'text' is null"),
        ("row 2", "column 'text' is empty or whitespace-only"),
        ("row 3", "column 'text' is empty or whitespace-only"),
        ("row 4", "invalid UTF-8 at byte 4: invalid start byte"),
        ("row 5", "column 'text' holds a NUL byte"),
    ]
    numbers = parquet(tmp_path / "b.parquet", {"text": [1, 2]})
    assert malformed(read(numbers)) == [
        ("row 0", "column 'text' is a number, not a string"),
        ("row 1", "column 'text' is a number, not a string"),
    ]


# --- spans: a large file read in pieces gives what reading it whole gives


def read_in_spans(file: Path, cuts: list[int], **spec: object) -> list[tuple[str, str, str]]:
    """Records of `file` read span by span, line numbers made file-wide from each span's line
    count, and "empty file" added when no span held a record, as `data_pipeline` does."""
    config = InputConfig(path=str(file), **spec)
    spans = [Span(a, b) for a, b in zip(cuts, [*cuts[1:], None], strict=True)]
    found, offset, records = [], 0, 0
    for span in spans:
        stats = ReadStats()
        for record in read_records(str(file), config, span, stats):
            location = record.location
            if location.startswith("line "):
                location = f"line {int(location[5:]) + offset}"
            found.append((type(record).__name__, location, _content(record)))
        offset, records = offset + stats.lines, records + stats.records
    if records == 0:
        found.append(("Malformed", "file", "empty file"))
    return found


def _content(record: Record) -> str:
    return record.text if isinstance(record, Document) else record.reason


def read_whole(file: Path, **spec: object) -> list[tuple[str, str, str]]:
    return [(type(r).__name__, r.location, _content(r)) for r in read(file, **spec)]


@pytest.mark.parametrize("text_mode", ["jsonl", "line"])
def test_spans_of_a_line_file_give_its_records(tmp_path: Path, text_mode: str) -> None:
    rng = np.random.default_rng(3)
    for trial in range(150):
        lines = []
        for i in range(int(rng.integers(0, 25))):
            kind = rng.random()
            if kind < 0.1:
                lines.append("")  # blank
            elif kind < 0.15:
                lines.append("   ")
            elif kind < 0.2 and text_mode == "jsonl":
                lines.append("{not json")
            else:
                text = "w" * int(rng.integers(1, 60)) + f" {i}"
                lines.append(json.dumps({"text": text}) if text_mode == "jsonl" else text)
        data = "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")
        if rng.random() < 0.2:
            data = data.replace("\n", "\r\n")
        if rng.random() < 0.2:
            data = "\ufeff" + data
        name = f"t{trial}.jsonl" if text_mode == "jsonl" else f"t{trial}.txt"
        file = write(tmp_path / name, data.encode())
        spec = {} if text_mode == "jsonl" else {"text_mode": "line"}
        size = file.stat().st_size
        cuts = sorted({0, *rng.integers(1, max(size, 2), int(rng.integers(1, 8))).tolist()})
        assert read_in_spans(file, cuts, **spec) == read_whole(file, **spec), (trial, cuts)


def test_a_line_longer_than_a_span_belongs_to_the_span_it_starts_in(tmp_path: Path) -> None:
    texts = ["short", "x" * 5000, "after"]
    file = write(tmp_path / "a.jsonl", jsonl(texts))
    cuts = [0, 30, 1000, 2000, 3000]  # the long line spans four cuts
    assert read_in_spans(file, cuts) == read_whole(file)
    stats = ReadStats()
    assert list(read_records(str(file), InputConfig(path=str(file)), Span(1000, 2000), stats)) == []
    assert stats.records == 0


def test_parquet_row_group_spans(tmp_path: Path) -> None:
    strings = [f"row {i}" if i % 7 else None for i in range(100)]
    file = parquet(tmp_path / "a.parquet", {"text": strings}, row_group_size=10)
    groups = parquet_row_group_sizes(str(file))
    assert len(groups) == 10 and all(size > 0 for size in groups)
    whole = read_whole(file)
    assert read_in_spans(file, [0, 3, 4, 9]) == whole
    other = parquet(tmp_path / "b.parquet", {"body": strings}, row_group_size=10)
    # a file-wide problem is told once, by the span that starts the file
    assert read_in_spans(other, [0, 5]) == [
        ("Malformed", "file", "no column 'text'; the columns are 'body'")
    ]


def test_what_can_be_read_in_spans() -> None:
    spec = InputConfig(path="x")
    assert splittable("a.jsonl", spec) == "bytes"
    assert splittable("a.parquet", spec) == "row_groups"
    assert splittable("a.jsonl.gz", spec) is None  # a gzip stream cannot be entered midway
    assert splittable("a.jsonl.zst", spec) is None
    assert splittable("a.txt", spec) is None  # one document per file
    assert splittable("a.txt", InputConfig(path="x", text_mode="line")) == "bytes"
