"""Readers: expand an input into its files, and stream the records of one file.

An input is a local file, a directory (read recursively), a glob (`data/**/*.jsonl.gz`), an
fsspec URL (`s3://`, `gs://`, `memory://`, `file://`, with or without a glob), or `stdlib://`,
the `.py` sources of this Python's standard library: Kiln's embedded default corpus.

Expanding an input raises `InputError` for user mistakes (a missing path, a glob matching
nothing). Reading a file never raises for bad content: every bad record becomes a `Malformed`,
and reading goes on wherever the file still allows it.

A large file is read in spans (`Span`), so that one file is several units of parallel work:
an uncompressed JSON Lines or per-line text file by byte ranges (a span owns the lines that
start inside it: where a range cuts a line, the line belongs to the span it starts in), a
Parquet file by row groups. gzip and zstd streams cannot be entered in the middle, so compressed
files are always read whole. Reading the spans of a file one after another gives the records of
reading it whole, with two differences the caller resolves (`data_pipeline.plan` does): line
numbers count from the span's first line, and a span never reports "empty file" (a file of
blank lines is empty only if all its spans are; `ReadStats.records` tells).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from glob import glob
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from fsspec.registry import known_implementations

from data_pipeline.config import InputConfig
from data_pipeline.errors import KilnError
from data_pipeline.records import Document, Malformed, Record

STDLIB_URL = "stdlib://"
PREVIEW_CHARS = 200
CHUNK_BYTES = 1 << 20  # bytes asked of a (decompressed) stream at a time
ZSTD_INPUT_BYTES = 1 << 16  # compressed bytes fed at a time: bounds the memory one step takes
ZSTD_MAX_WINDOW = 1 << 31  # accept frames written with `zstd --long=31`
PARQUET_BATCH_ROWS = 256
UTF8_BOM = b"\xef\xbb\xbf"

# Name suffixes whose format is known: (base suffix, format, may carry .gz/.zst on top).
KNOWN_SUFFIXES: tuple[tuple[str, str, bool], ...] = (
    (".jsonl", "jsonl", True),
    (".parquet", "parquet", False),
    (".txt", "text", True),
    (".py", "text", True),
    (".md", "text", True),
)
COMPRESSIONS: tuple[tuple[str, str], ...] = ((".gz", "gzip"), (".zst", "zstd"))
_NO_KNOWN_FILE = (
    "the directory holds no file of a known format (.jsonl, .parquet, .txt, ... optionally "
    ".gz/.zst); to read other names, give a glob such as DIR/**/*"
)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_GLOB_MAGIC = re.compile(r"[*?\[]")
_SURROGATE = re.compile("[\ud800-\udfff]")

# What reading a byte stream may raise when the file or its compression is damaged.
_STREAM_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
# What opening a file may raise: a missing file, a directory, no permission, no filesystem.
_OPEN_ERRORS = (OSError, ImportError, ValueError)
_PARQUET_ERRORS = (OSError, pa.ArrowException, ValueError)


class InputError(KilnError, ValueError):  # ValueError: as tested (test_readers)
    """A user mistake about an input path. `str(error)` is one line: `PATH: PROBLEM`.

    `InputError(path, problem)`, or `InputError(message)` for a message already whole.
    """

    def __init__(self, path: str, problem: str | None = None) -> None:
        self.path = path if problem is not None else ""
        self.problem = _one_line(problem if problem is not None else path)
        super().__init__(f"{path}: {self.problem}" if problem is not None else self.problem)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: Ray ships errors between processes
        return (type(self), (self.path, self.problem) if self.path else (self.problem,))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Expanding an input into files


def expand_input(path: str) -> list[str]:
    """The files of one input, sorted. Raises `InputError` when it names no readable file."""
    if not path.strip():
        raise InputError(repr(path), "the input path is empty")
    if path.startswith(STDLIB_URL):
        if path != STDLIB_URL:
            raise InputError(path, f"give {STDLIB_URL} alone: it names the whole standard library")
        return stdlib_corpus_files()
    if _is_url(path):
        return _expand_url(path)
    return _expand_local(path)


def stdlib_corpus_files() -> list[str]:
    """The `.py` files of this Python's standard library, without site-packages and caches."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "__pycache__")]
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(f for f in files if os.path.isfile(f))


def infer_format(file: str) -> str:
    """`jsonl`, `parquet` or `text`, from the file name. Raises `InputError` when unknown."""
    fmt = _known_format(file)
    if fmt is None:
        raise InputError(
            file,
            "cannot tell the format from the name (known: .jsonl, .json.gz, .parquet, .txt, "
            ".py, .md, text and JSON Lines also with .gz or .zst); set the input's format",
        )
    return fmt


def _known_format(file: str) -> str | None:
    name = file.lower()
    compressed = False
    for suffix, _ in COMPRESSIONS:
        if name.endswith(suffix):
            name, compressed = name.removesuffix(suffix), True
            break
    if compressed and name.endswith(".json"):  # compressed JSON dumps are JSON Lines (C4, Pile)
        return "jsonl"
    for suffix, fmt, compressible in KNOWN_SUFFIXES:
        if name.endswith(suffix) and (compressible or not compressed):
            return fmt
    return None


def _compression(file: str) -> str | None:
    name = file.lower()
    return next((codec for suffix, codec in COMPRESSIONS if name.endswith(suffix)), None)


def _is_url(path: str) -> bool:
    return _URL.match(path) is not None


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def _expand_local(path: str) -> list[str]:
    path = os.path.expanduser(path)
    if _GLOB_MAGIC.search(path):
        files = sorted(f for f in glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise InputError(path, "the glob matches no file")
        return files
    if os.path.isdir(path):
        return _files_of_directory(path)
    if os.path.exists(path):
        return [path]
    raise InputError(path, "no such file or directory")


def _files_of_directory(path: str) -> list[str]:
    files = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            file = os.path.join(folder, name)
            if not name.startswith(".") and _known_format(name) and os.path.isfile(file):
                files.append(file)
    if not files:
        raise InputError(path, _NO_KNOWN_FILE)
    return sorted(files)


def _expand_url(url: str) -> list[str]:
    fs, root = _filesystem(url)
    try:
        if _GLOB_MAGIC.search(root):
            found = _glob_url(fs, root)
            if not found:
                raise InputError(url, "the glob matches no file")
        else:
            found = _url_tree(fs, root, url)
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(url, f"cannot list: {exc}") from exc
    return [fs.unstrip_protocol(p) for p in sorted(found)]


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        known = known_implementations.get(protocol)
        if known is None:
            raise InputError(url, f"cannot load the {protocol}:// filesystem: {exc}") from exc
        package = known["class"].split(".")[0]
        problem = f"reading {protocol}:// needs the {package} package (pip install {package})"
        raise InputError(url, problem) from exc
    except ValueError as exc:
        raise InputError(url, f"unknown URL protocol {protocol}://: {exc}") from exc


def _glob_url(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    prefix = pattern[: _GLOB_MAGIC.search(pattern).start()].rsplit("/", 1)[0]
    matches = fs.glob(pattern, detail=True)
    return [
        p
        for p, info in matches.items()
        if info.get("type") == "file" and not _is_hidden(p[len(prefix) :])
    ]


def _url_tree(fs: fsspec.AbstractFileSystem, root: str, url: str) -> list[str]:
    try:
        info = fs.info(root)
    except FileNotFoundError:
        raise InputError(url, "no such file or directory") from None
    if info.get("type") != "directory":
        return [info.get("name", root)]
    found = fs.find(root, detail=True)
    files = [
        p
        for p, i in found.items()
        if i.get("type") == "file"
        and not _is_hidden(p[len(root.rstrip("/")) :])
        and _known_format(p)
    ]
    if not files:
        raise InputError(url, _NO_KNOWN_FILE)
    return files


# ---------------------------------------------------------------------------------------------
# Reading one file


@dataclass(frozen=True)
class Span:
    """A part of one file: bytes [start, stop) of a line file (the lines starting there), or
    row groups [start, stop) of a Parquet file; `stop` None reads to the end."""

    start: int = 0
    stop: int | None = None

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


WHOLE = Span()


@dataclass
class ReadStats:
    """What reading a span found, filled in as it is read."""

    lines: int = 0  # lines read, blank ones included (line formats)
    records: int = 0  # records yielded, documents and malformed ones


def splittable(file: str, spec: InputConfig) -> str | None:
    """How `file` can be read in spans: "bytes", "row_groups", or None (only whole)."""
    fmt = infer_format(file) if spec.format == "auto" else spec.format
    if fmt == "parquet":
        return "row_groups"
    if _compression(file) is not None:
        return None
    if fmt == "jsonl" or spec.text_mode == "line":
        return "bytes"
    return None


def read_records(
    file: str, spec: InputConfig, span: Span = WHOLE, stats: ReadStats | None = None
) -> Iterator[Record]:
    """Stream the records of one file (or of `span` of it): `Document`s, and a `Malformed` for
    each bad record. `stats`, when given, is updated while reading.

    Raises `InputError` (at once, not while iterating) only when `spec.format` is `auto` and
    the name tells no format; the iteration itself never raises for bad content.
    """
    fmt = infer_format(file) if spec.format == "auto" else spec.format
    stats = stats if stats is not None else ReadStats()
    if fmt == "parquet":
        return _counted(_read_parquet(file, spec.text_field, span), stats)
    if fmt == "jsonl":
        parse = _json_parser(file, spec.text_field)
    elif spec.text_mode == "line":
        parse = _text_line_parser(file)
    else:
        if not span.whole:
            raise ValueError(f"{file}: a whole-file text document cannot be read in spans")
        return _counted(_read_text_document(file), stats)
    return _counted(_read_lines(file, parse, span, stats), stats)


def _counted(records: Iterator[Record], stats: ReadStats) -> Iterator[Record]:
    for record in records:
        stats.records += 1
        yield record


def _preview(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[:PREVIEW_CHARS].decode("utf-8", errors="replace")
    return raw[:PREVIEW_CHARS]


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else f"a {type(value).__name__}"


def _text_problem(text: str) -> str | None:
    """What makes a decoded text no usable document ("is empty ...", "holds ..."), or None."""
    if not text or text.isspace():
        return "is empty or whitespace-only"
    if "\x00" in text:
        return "holds a NUL byte"
    if not text.isascii() and _SURROGATE.search(text):
        return "holds a lone surrogate (invalid Unicode)"
    return None


def _value_problem(value: object, what: str) -> str | None:
    """Why a field's value is no usable text, or None. `what` names it: "field 'text'"."""
    if value is None:
        return f"{what} is null"
    if not isinstance(value, str):
        return f"{what} is {_json_kind(value)}, not a string"
    problem = _text_problem(value)
    return f"{what} {problem}" if problem else None


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 at byte {exc.start}: {exc.reason}"


# --- files of lines: JSON Lines, and plain text read per line


@contextmanager
def _open_raw(file: str) -> Iterator[BinaryIO]:
    """The file's bytes as stored: through fsspec for URLs, `open` otherwise."""
    if _is_url(file):
        with fsspec.open(file, "rb") as stream:
            yield stream
    else:
        with open(file, "rb") as stream:
            yield stream


def _decompressed(raw: BinaryIO, codec: str | None) -> Iterator[bytes]:
    """Chunks of the decompressed bytes. A truncated stream raises EOFError at its end."""
    if codec == "zstd":
        yield from _zstd_chunks(raw)
        return
    if codec == "gzip":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        # read1: one step at a time, so that what precedes a truncation is not lost with it
        while chunk := stream.read1(CHUNK_BYTES):
            yield chunk
        return
    while chunk := raw.read(CHUNK_BYTES):
        yield chunk


def _zstd_chunks(raw: BinaryIO) -> Iterator[bytes]:
    """Decompress frame after frame, so that a stream cut inside a frame is noticed (zstandard's
    stream reader ends quietly there)."""
    context = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    frame, in_frame = context.decompressobj(), False
    while data := raw.read(ZSTD_INPUT_BYTES):
        while data:
            if out := frame.decompress(data):
                yield out
            in_frame = True
            if not frame.eof:
                break
            data = frame.unused_data
            frame, in_frame = context.decompressobj(), False
    if in_frame:
        raise EOFError("the stream ends inside a zstd frame")


def _stream_problem(exc: BaseException, codec: str | None) -> str:
    name = {"gzip": "gzip", "zstd": "zstd"}.get(codec or "", "")
    if isinstance(exc, EOFError) and name:
        return f"truncated {name} stream: {exc}"
    if isinstance(exc, zlib.error | gzip.BadGzipFile | zstandard.ZstdError) and name:
        return f"corrupt {name} stream: {exc}"
    return f"read error: {exc}"


def _numbered_lines(file: str, span: Span = WHOLE) -> Iterator[tuple[int, bytes] | Malformed]:
    """(line number, line without its `\\n` or `\\r\\n`), 1-based from the span's first line,
    for the lines that start inside `span`. A file that cannot be opened gives one Malformed
    "file"; a damaged stream ends with a Malformed at the broken line."""
    codec = _compression(file)
    if codec is not None and not span.whole:
        raise ValueError(f"{file}: a compressed file cannot be read in byte ranges")
    stop = span.stop
    with ExitStack() as stack:
        try:
            raw = stack.enter_context(_open_raw(file))
            if span.start:
                raw.seek(span.start - 1)  # the line holding byte start - 1 is the previous span's
        except _OPEN_ERRORS as exc:
            yield Malformed(file, "file", f"unreadable file: {exc}")
            return
        position = max(span.start - 1, 0)  # file offset of the next chunk's first byte
        skipping = span.start > 0  # until the first newline at or after start - 1
        line_start = span.start  # file offset where the pending line starts
        lineno, pending = 0, []
        try:
            for chunk in _decompressed(raw, codec):
                chunk_start, position = position, position + len(chunk)
                if skipping:
                    cut = chunk.find(b"\n")
                    if cut < 0:
                        continue
                    skipping = False
                    chunk_start, chunk = chunk_start + cut + 1, chunk[cut + 1 :]
                    line_start = chunk_start
                *complete, rest = chunk.split(b"\n")
                cursor = chunk_start
                for line in complete:
                    cursor += len(line) + 1
                    if stop is not None and line_start >= stop:
                        return
                    if pending:
                        line, pending = b"".join([*pending, line]), []
                    lineno += 1
                    yield lineno, _strip_line(line, lineno == 1 and span.start == 0)
                    line_start = cursor
                if stop is not None and line_start >= stop:
                    return
                if rest:
                    pending.append(rest)
        except _STREAM_ERRORS as exc:
            problem = _stream_problem(exc, codec)
            yield Malformed(file, f"line {lineno + 1}", problem, _preview(b"".join(pending)))
            return
        if pending and not skipping:
            yield lineno + 1, _strip_line(b"".join(pending), lineno == 0 and span.start == 0)


def _strip_line(line: bytes, file_start: bool) -> bytes:
    if line.endswith(b"\r"):
        line = line[:-1]
    if file_start and line.startswith(UTF8_BOM):  # a byte-order mark is encoding, not text
        line = line[len(UTF8_BOM) :]
    return line


def _read_lines(
    file: str, parse: Callable[[str, bytes], Record], span: Span, stats: ReadStats
) -> Iterator[Record]:
    """One record per non-blank line; "empty file" when a whole file has none."""
    empty = True
    for item in _numbered_lines(file, span):
        if isinstance(item, Malformed):
            empty = False
            yield item
            continue
        lineno, line = item
        stats.lines = lineno
        if not line or line.isspace():
            continue
        empty = False
        yield parse(f"line {lineno}", line)
    if empty and span.whole:
        yield Malformed(file, "file", "empty file")


def _json_parser(file: str, field: str) -> Callable[[str, bytes], Record]:
    return lambda location, line: _json_record(file, location, line, field)


def _text_line_parser(file: str) -> Callable[[str, bytes], Record]:
    return lambda location, line: _text_line_record(file, location, line)


def _json_record(file: str, location: str, line: bytes, field: str) -> Record:
    def bad(reason: str) -> Malformed:
        return Malformed(file, location, reason, _preview(line))

    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return bad(_utf8_problem(exc))
    except json.JSONDecodeError as exc:
        return bad(f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return bad("invalid JSON: nested too deeply")
    except ValueError as exc:  # an integer of too many digits
        return bad(f"invalid JSON: {exc}")
    if not isinstance(value, dict):
        return bad(f"the JSON value is {_json_kind(value)}, not an object")
    if field not in value:
        return bad(f"missing field {field!r}")
    problem = _value_problem(value[field], f"field {field!r}")
    return bad(problem) if problem else Document(file, location, value[field])


def _text_line_record(file: str, location: str, line: bytes) -> Record:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Malformed(file, location, _utf8_problem(exc), _preview(line))
    if "\x00" in text:
        return Malformed(file, location, "the text holds a NUL byte", _preview(line))
    return Document(file, location, text)


# --- plain text, one document per file


def _read_text_document(file: str) -> Iterator[Record]:
    """The whole file as one document, located "file"."""
    codec = _compression(file)
    try:
        with _open_raw(file) as raw:
            try:
                data = b"".join(_decompressed(raw, codec))
            except _STREAM_ERRORS as exc:
                yield Malformed(file, "file", _stream_problem(exc, codec))
                return
    except _OPEN_ERRORS as exc:
        yield Malformed(file, "file", f"unreadable file: {exc}")
        return
    yield _text_document(file, data.removeprefix(UTF8_BOM))


def _text_document(file: str, data: bytes) -> Record:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Malformed(file, "file", _utf8_problem(exc), _preview(data))
    if not text or text.isspace():
        return Malformed(file, "file", "empty file", _preview(data))
    if "\x00" in text:
        return Malformed(file, "file", "the text holds a NUL byte", _preview(data))
    return Document(file, "file", text)


# --- Parquet


def _read_parquet(file: str, field: str, span: Span) -> Iterator[Record]:
    """One record per row of column `field` in the row groups of `span`, read in batches.
    Problems of the whole file are reported by the span that starts it."""
    with ExitStack() as stack:
        try:
            source = file if not _is_url(file) else stack.enter_context(_open_raw(file))
            parquet = stack.enter_context(pq.ParquetFile(source))
            columns = parquet.schema_arrow.names
        except (*_PARQUET_ERRORS, ImportError) as exc:
            if span.start == 0:
                reason = "empty file" if _is_empty(file) else f"unreadable Parquet file: {exc}"
                yield Malformed(file, "file", reason)
            return
        if field not in columns:
            if span.start == 0:
                existing = ", ".join(repr(c) for c in columns) or "none"
                yield Malformed(file, "file", f"no column {field!r}; the columns are {existing}")
            return
        if parquet.metadata.num_rows == 0:
            yield Malformed(file, "file", "empty file")
            return
        yield from _parquet_rows(file, parquet, field, span)


def _parquet_rows(file: str, parquet: pq.ParquetFile, field: str, span: Span) -> Iterator[Record]:
    """The rows of row groups [span.start, span.stop), numbered from the file's first row; a
    row group that cannot be read is one Malformed, and reading goes on with the next."""
    metadata = parquet.metadata
    stop = metadata.num_row_groups if span.stop is None else min(span.stop, metadata.num_row_groups)
    row = sum(metadata.row_group(g).num_rows for g in range(span.start))
    for group in range(span.start, stop):
        first, size = row, metadata.row_group(group).num_rows
        try:
            batches = parquet.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[field]
            )
            for batch in batches:
                for value in _column_values(batch.column(0)):
                    yield _parquet_record(file, row, value, field)
                    row += 1
        except _PARQUET_ERRORS as exc:
            lost = f"rows {row} to {first + size - 1}"
            yield Malformed(
                file, f"row {row}", f"corrupt Parquet row group {group} ({lost} lost): {exc}"
            )
        row = first + size


def parquet_row_group_sizes(file: str) -> list[int]:
    """The compressed size in bytes of each row group of a Parquet file ([] if unreadable)."""
    try:
        with ExitStack() as stack:
            source = file if not _is_url(file) else stack.enter_context(_open_raw(file))
            metadata = stack.enter_context(pq.ParquetFile(source)).metadata
            return [
                sum(
                    metadata.row_group(g).column(c).total_compressed_size
                    for c in range(metadata.num_columns)
                )
                for g in range(metadata.num_row_groups)
            ]
    except (*_PARQUET_ERRORS, ImportError):
        return []


def _column_values(column: pa.Array) -> list[object]:
    """Python values; a string that is not UTF-8 becomes its UnicodeDecodeError."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [_scalar_value(column[i]) for i in range(len(column))]


def _scalar_value(scalar: pa.Scalar) -> object:
    try:
        return scalar.as_py()
    except UnicodeDecodeError as exc:
        return exc


def _parquet_record(file: str, row: int, value: object, field: str) -> Record:
    location = f"row {row}"
    if isinstance(value, UnicodeDecodeError):
        return Malformed(file, location, _utf8_problem(value), _preview(value.object))
    problem = _value_problem(value, f"column {field!r}")
    if problem:
        return Malformed(file, location, problem, _preview(repr(value)))
    return Document(file, location, value)


def _is_empty(file: str) -> bool:
    """Whether the file holds 0 bytes (False when that cannot be told)."""
    try:
        if _is_url(file):
            fs, path = fsspec.core.url_to_fs(file)
            return fs.size(path) == 0
        return os.path.getsize(file) == 0
    except (OSError, ImportError, ValueError):
        return False
