"""Planning: files grouped into parts, large files cut into spans, shuffle sizes from the input."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import DataConfig
from data_pipeline.plan import MIN_BUCKETS, plan_parts
from tests.support.corpus import distinct_documents, write_jsonl


def data(inputs: list, part_size_mb: float) -> DataConfig:
    return DataConfig.model_validate({"inputs": inputs, "part_size_mb": part_size_mb})


def test_large_line_files_become_byte_spans_and_small_ones_are_grouped(tmp_path: Path) -> None:
    _, _, texts = distinct_documents(seed=1, count=300)
    big = write_jsonl(tmp_path / "c" / "0_big.jsonl", texts)  # ~700 kB
    for i in range(4):
        write_jsonl(tmp_path / "c" / f"1_small{i}.jsonl", texts[i : i + 3])
    plan = plan_parts(data([str(tmp_path / "c")], part_size_mb=0.2))
    size = big.stat().st_size
    spans = [p.pieces[0].span for p in plan.parts if p.pieces[0].file == str(big)]
    assert len(spans) == -(-size // 200_000) and spans[0] == (0, 200_000)
    assert spans[-1][1] is None and all(len(p.pieces) == 1 for p in plan.parts[: len(spans)])
    small = plan.parts[len(spans) :]
    assert len(small) == 1 and len(small[0].pieces) == 4  # grouped: together under a part
    assert all(os.path.isabs(piece.file) for p in plan.parts for piece in p.pieces)


def test_what_stays_whole(tmp_path: Path) -> None:
    _, _, texts = distinct_documents(seed=2, count=200)
    lines = "".join(t.replace("\n", " ") + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))  # compressed: one stream
    (tmp_path / "b.txt").write_bytes(lines)  # a text document: one document
    plan = plan_parts(data([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.txt")], 0.01))
    assert [piece.span for part in plan.parts for piece in part.pieces] == [None, None]
    per_line = data([{"path": str(tmp_path / "b.txt"), "text_mode": "line"}], 0.01)
    assert len(plan_parts(per_line).parts) > 5  # the same file read per line is cut


def test_parquet_is_cut_by_row_groups(tmp_path: Path) -> None:
    _, _, texts = distinct_documents(seed=3, count=400)
    file = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), file, row_group_size=40, compression="none")
    plan = plan_parts(data([str(file)], part_size_mb=file.stat().st_size / 3.5e6))
    spans = [p.pieces[0].span for p in plan.parts]
    assert 3 <= len(spans) <= 5 and spans[0][0] == 0 and spans[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous


def test_bucket_counts_follow_the_input_size_only(tmp_path: Path) -> None:
    _, _, texts = distinct_documents(seed=4, count=20)
    write_jsonl(tmp_path / "a.jsonl", texts)
    plan = plan_parts(data([str(tmp_path / "a.jsonl")], 8))
    assert plan.exact_buckets == plan.near_buckets == MIN_BUCKETS
    assert plan.input_bytes == (tmp_path / "a.jsonl").stat().st_size
