"""ShardWriter and ErrorLog: shard rolling, exact schema, validation, failure handling, torn lines."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from twotower_cli.io.rundir import Layout, RunDirError
from twotower_cli.io.schema import (
    COLUMN_NAMES,
    META_FINGERPRINT,
    META_SCHEMA_VERSION,
    SCHEMA_VERSION,
    RejectedRow,
    check_record,
    output_schema,
)
from twotower_cli.io.writer import ErrorLog, ShardWriter, read_errors

NAMES = Layout()  # the unpartitioned run's names


def rec(i: int | str, **kw) -> dict:
    r = {
        "id": str(i), "prompt": f"prompt {i}", "completion": f"completion {i}", "mode": "diffusion",
        "gamma": 0.8, "block_size": 16, "steps_per_block": 16, "temperature": 0.0, "seed": 0,
        "prompt_tokens": 5, "completion_tokens": 32, "denoiser_steps": 12, "context_forwards": 3,
        "tokens_per_step": 32 / 12, "blocks": 2, "finish_reason": "eos", "latency_s": 0.25,
        "model": "tiny@sha256:0123", "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    }
    r.update(kw)
    return r


def visible(d) -> list[str]:
    return sorted(e for e in os.listdir(d) if not e.startswith("."))


def test_shards_roll_at_rows_per_shard_with_row_groups(tmp_path):
    committed = []
    w = ShardWriter(tmp_path, {"k": "v"}, rows_per_shard=10, row_group_rows=4, names=NAMES,
                    on_commit=committed.append)
    for i in range(25):
        w.add(rec(i))
        # while a shard is open only its hidden .tmp exists, never a partial part-*.parquet
        assert all(e.startswith("part-") for e in visible(tmp_path))
    assert visible(tmp_path) == ["part-00000.parquet", "part-00001.parquet"]
    assert w.pending_rows == 5 and w.is_pending("24") and not w.is_pending("0")
    w.close()
    assert visible(tmp_path) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert os.listdir(tmp_path) and not any(e.endswith(".tmp") for e in os.listdir(tmp_path))
    assert [(c.name, c.rows) for c in committed] == [
        ("part-00000.parquet", 10), ("part-00001.parquet", 10), ("part-00002.parquet", 5)]
    assert committed[1].ids == [str(i) for i in range(10, 20)]
    assert w.done == {str(i) for i in range(25)}
    md = pq.ParquetFile(tmp_path / "part-00000.parquet").metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [4, 4, 2]
    assert md.row_group(0).column(0).compression == "ZSTD"
    got = ds.dataset(tmp_path, format="parquet").to_table().sort_by("id")
    assert got.num_rows == 25 and sorted(got["id"].to_pylist()) == sorted(str(i) for i in range(25))


def test_schema_types_and_metadata(tmp_path):
    with ShardWriter(tmp_path, {META_FINGERPRINT: '{"gamma":0.8}'}, names=NAMES) as w:
        w.add(rec("a"))
        w.add(rec("b", mode="ar", gamma=None, tokens_per_step=1, latency_s=1))  # ints -> float64
    f = tmp_path / "part-00000.parquet"
    schema = pq.read_schema(f)
    assert schema.names == COLUMN_NAMES
    assert schema.equals(output_schema(), check_metadata=False)
    types = {n: str(schema.field(n).type) for n in schema.names}
    assert types["id"] == "string" and types["gamma"] == "double" and types["seed"] == "int64"
    assert types["created_at"] == "timestamp[us, tz=UTC]"
    assert not schema.field("id").nullable and schema.field("gamma").nullable
    meta = schema.metadata
    assert meta[META_SCHEMA_VERSION.encode()] == SCHEMA_VERSION.encode()
    assert meta[META_FINGERPRINT.encode()] == b'{"gamma":0.8}'
    rows = pq.read_table(f).to_pylist()
    assert rows[1]["gamma"] is None and rows[1]["tokens_per_step"] == 1.0
    assert rows[0]["created_at"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": True}, "64-bit integer"),
        ({"blocks": 1.5}, "64-bit integer"),
        ({"seed": 2**63}, "64-bit integer"),
        ({"gamma": "0.8"}, "must be a number"),
        ({"tokens_per_step": float("nan")}, "finite"),
        ({"completion": None}, "'completion' is required"),
        ({"prompt": ["list"]}, "must be a string"),
        ({"created_at": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"tokens_per_sec": 3.0}, "unknown output column"),
    ],
)
def test_check_record_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        check_record(rec(1, **change))


def test_check_record_fills_created_at_and_nulls():
    r = check_record({"id": "x", "prompt": "p", "completion": "c"})
    assert r["mode"] is None and r["created_at"].tzinfo is not None


def test_duplicate_id_refused(tmp_path):
    w = ShardWriter(tmp_path, names=NAMES, rows_per_shard=2, done={"old"})
    with pytest.raises(ValueError, match="already written"):
        w.add(rec("old"))
    w.add(rec(1))
    with pytest.raises(ValueError, match="already written"):
        w.add(rec(1))  # in the open shard
    w.add(rec(2))  # commits the shard
    with pytest.raises(ValueError, match="already written"):
        w.add(rec(1))  # committed
    w.close()


def test_flush_commits_partial_shard_and_close_is_idempotent(tmp_path):
    w = ShardWriter(tmp_path, names=NAMES, rows_per_shard=100)
    assert w.flush() is None  # nothing buffered: no empty shard
    w.add(rec(1))
    info = w.flush()
    assert info.name == "part-00000.parquet" and info.rows == 1
    w.add(rec(2))
    w.close()
    w.close()
    assert visible(tmp_path) == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(RuntimeError):
        w.add(rec(3))


def test_empty_shard_is_a_valid_parquet_file(tmp_path):
    w = ShardWriter(tmp_path, names=NAMES)
    w.write_empty_shard()
    w.close()
    t = ds.dataset(tmp_path, format="parquet").to_table()
    assert t.num_rows == 0 and t.schema.names == COLUMN_NAMES


def test_write_failure_discards_open_shard(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path, names=NAMES, rows_per_shard=10, row_group_rows=2)
    w.add(rec(1))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", boom)
    with pytest.raises(RunDirError, match=r"cannot write .*part-00000.* No space left.*committed shards are kept"):
        w.add(rec(2))  # one line (a UserError: exit 2), naming the file
    assert w.failed and os.listdir(tmp_path) == []  # the .tmp is gone, nothing committed
    assert not w.is_pending("1")
    with pytest.raises(RuntimeError, match="failed"):
        w.add(rec(3))
    w.close()  # does not raise again
    assert os.listdir(tmp_path) == []


def test_exception_inside_with_block_still_commits_complete_rows(tmp_path):
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, names=NAMES) as w:
        w.add(rec(1))
        raise KeyboardInterrupt
    assert pq.read_table(tmp_path / "part-00000.parquet")["id"].to_pylist() == ["1"]


# ---- ErrorLog ---------------------------------------------------------------------------------


def test_errorlog_append_dedupe_and_torn_last_line(tmp_path):
    p = tmp_path / ".errors.jsonl"
    log = ErrorLog(p)
    assert log.add(RejectedRow(3, None, "malformed JSON: x", "{bad"))
    assert log.add(RejectedRow(7, "k", "duplicate id", '{"id": "k"}'))
    assert not log.add(RejectedRow(3, None, "malformed JSON: x", "{bad"))  # same (line, reason)
    log.close()
    # A crash tears the next line halfway.
    with open(p, "ab") as f:
        f.write(b'{"line_no": 9, "id": null, "reas')
    recs = list(read_errors(p))
    assert [(r["line_no"], r["id"], r["reason"]) for r in recs] == [
        (3, None, "malformed JSON: x"), (7, "k", "duplicate id")]
    assert recs[0]["raw"] == "{bad"
    # Reopening cuts the torn tail, so the next append starts on a fresh line.
    log = ErrorLog(p)
    assert log.count == 2
    assert not log.add(RejectedRow(7, "k", "duplicate id", '{"id": "k"}'))  # re-read on resume: not duplicated
    assert log.add(RejectedRow(9, None, "not a JSON object", "[1]"))
    log.close()
    lines = p.read_bytes().splitlines()
    assert len(lines) == 3 and p.read_bytes().endswith(b"\n")
    assert [r["line_no"] for r in read_errors(p)] == [3, 7, 9]


def test_errorlog_torn_file_without_any_newline(tmp_path):
    p = tmp_path / ".errors.jsonl"
    p.write_bytes(b'{"line_no": 1, "re')
    assert list(read_errors(p)) == []
    ErrorLog(p).close()
    assert p.read_bytes() == b""
    assert list(read_errors(tmp_path / "missing.jsonl")) == []


def test_pyarrow_table_roundtrip_matches_schema(tmp_path):
    """Committed shards concatenate without any cast: one stable schema for every shard."""
    with ShardWriter(tmp_path, names=NAMES, rows_per_shard=1) as w:
        w.add(rec(1))
        w.add(rec(2, mode=None, finish_reason="length"))
    tables = [pq.read_table(tmp_path / n) for n in visible(tmp_path)]
    assert pa.concat_tables(tables).num_rows == 2
