"""io.formats: the jsonl and openai line encodings, both ways, and the `-o -` sink in each format."""

from __future__ import annotations

import io
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_cli.io.formats import (
    OPENAI_EXTRA_COLUMNS,
    check_format,
    encode_line,
    line_key,
    record_from_line,
    shard_ext,
    sniff_format,
)
from twotower_cli.io.jsonl_out import JsonlSink
from twotower_cli.io.schema import COLUMN_NAMES, check_record, output_schema, sample_key

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)


def rec(i: int | str = 1, **kw) -> dict:
    r = {
        "id": str(i), "sample_index": 0, "prompt": f"prompt {i}", "chat": False, "completion": f"completion {i}",
        "mode": "diffusion", "gamma": 0.8, "block_size": 16, "steps_per_block": 16, "temperature": 0.7, "seed": 42,
        "top_k": 50, "top_p": 0.9, "min_p": None, "prompt_tokens": 5, "completion_tokens": 32, "denoiser_steps": 12,
        "context_forwards": 3, "tokens_per_step": 32 / 12, "blocks": 2, "finish_reason": "eos", "latency_s": 0.25,
        "repetition": 0.125, "model": "tiny@sha256:0123", "input_hash": "0123456789abcdef",
        "metadata": '{"source":"wiki","tags":["a","b"],"n":3}', "created_at": T0,
    }
    r.update(kw)
    return r


def parquet_twin(tmp_path, records: list[dict], extra=()) -> list[dict]:
    """The rows as a Parquet shard gives them back."""
    schema = output_schema(extra=extra)
    path = tmp_path / "twin.parquet"
    pq.write_table(pa.Table.from_pylist([check_record(r, extra) for r in records], schema=schema), path)
    return pq.read_table(path).to_pylist()


# ---- openai ------------------------------------------------------------------------------------


def test_openai_line_has_the_documented_shape():
    line = encode_line(check_record(rec(7, sample_index=2)), "openai")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    o = orjson.loads(line)
    assert list(o) == ["id", "custom_id", "response", "error", "twotower"]
    assert o["custom_id"] == "7" and o["error"] is None
    assert o["id"].startswith("batch_req_") and len(o["id"]) == len("batch_req_") + 32
    resp = o["response"]
    assert resp["status_code"] == 200 and len(resp["request_id"]) == 32
    int(resp["request_id"], 16)
    body = resp["body"]
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["created"] == int(T0.timestamp()) and body["model"] == "tiny@sha256:0123"
    assert body["choices"] == [{"index": 2, "text": "completion 7", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 32, "total_tokens": 37}
    tt = o["twotower"]
    assert tuple(tt) == OPENAI_EXTRA_COLUMNS  # every other column, in schema order
    assert "completion" not in tt and "id" not in tt and "sample_index" not in tt
    assert tt["finish_reason"] == "eos" and tt["created_at"] == "2026-01-02T03:04:05.123456Z"
    assert tt["metadata"] == {"source": "wiki", "tags": ["a", "b"], "n": 3}  # an object, not a string
    # chat rows: a chat.completion with the assistant message; length stays length
    c = orjson.loads(encode_line(check_record(rec(8, chat=True, finish_reason="length")), "openai"))
    assert c["response"]["body"]["object"] == "chat.completion"
    assert c["response"]["body"]["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "completion 8"}, "finish_reason": "length"}]
    s = orjson.loads(encode_line(check_record(rec(9, finish_reason="stop", prompt_tokens=None)), "openai"))
    assert s["response"]["body"]["choices"][0]["finish_reason"] == "stop"
    assert s["response"]["body"]["usage"] == {"prompt_tokens": None, "completion_tokens": 32, "total_tokens": None}


def test_openai_ids_are_deterministic_per_row_key():
    a = orjson.loads(encode_line(check_record(rec(1, created_at=T0)), "openai"))
    b = orjson.loads(encode_line(check_record(rec(1, created_at=T0 + timedelta(days=1), completion="x")), "openai"))
    other_sample = orjson.loads(encode_line(check_record(rec(1, sample_index=1)), "openai"))
    other_id = orjson.loads(encode_line(check_record(rec(2)), "openai"))

    def ids(o):
        return o["id"], o["response"]["request_id"], o["response"]["body"]["id"]

    assert ids(a) == ids(b)  # a function of the row key only
    req, request_id, cmpl = ids(a)
    assert len({req.removeprefix("batch_req_"), request_id, cmpl.removeprefix("cmpl-")}) == 3  # three digests
    for o in (other_sample, other_id):
        assert not set(ids(o)) & set(ids(a))
    assert other_sample["custom_id"] == a["custom_id"] == "1"  # samples of one prompt share custom_id
    # the same record always gives the same bytes
    assert encode_line(check_record(rec(3)), "openai") == encode_line(check_record(rec(3)), "openai")


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_lines_round_trip_to_the_parquet_twin(tmp_path, fmt):
    records = [rec(1), rec(1, sample_index=1, chat=True, finish_reason="stop", metadata=None),
               rec("é 🙂\t\"q\"", sample_index=3, finish_reason="length", repetition=None, model=None,
                   prompt_tokens=None, completion_tokens=None, gamma=None, input_hash=None),
               rec(4, finish_reason=None, metadata="not json {", completion="", mode="ar"),
               rec(5, metadata='["a list"]', created_at=datetime(2026, 5, 1, tzinfo=timezone.utc))]
    twin = parquet_twin(tmp_path, records)
    got = [record_from_line(encode_line(check_record(r), fmt), fmt) for r in records]
    assert got == twin
    assert [list(g) for g in got] == [COLUMN_NAMES] * len(records)
    assert [line_key(encode_line(check_record(r), fmt), fmt) for r in records] == [
        sample_key(r["id"], r["sample_index"]) for r in records]
    assert {sniff_format(encode_line(check_record(r), fmt)) for r in records} == {fmt}


def test_jsonl_line_every_column_created_at_utc_metadata_object():
    o = orjson.loads(encode_line(check_record(rec(1)), "jsonl"))
    assert list(o) == COLUMN_NAMES
    assert o["created_at"] == "2026-01-02T03:04:05.123456Z"
    assert o["metadata"] == {"source": "wiki", "tags": ["a", "b"], "n": 3}
    assert orjson.loads(encode_line(check_record(rec(1, metadata="x")), "jsonl"))["metadata"] == "x"


EXTRA = [
    pa.field("n", pa.int64()), pa.field("score", pa.float64()), pa.field("ok", pa.bool_()),
    pa.field("tag", pa.string()), pa.field("when", pa.timestamp("us", tz="UTC")),
    pa.field("naive", pa.timestamp("ms")), pa.field("ids", pa.list_(pa.int64())),
    pa.field("info", pa.struct([("a", pa.string()), ("b", pa.list_(pa.float64()))])),
    pa.field("blob", pa.binary()), pa.field("price", pa.decimal128(10, 3)), pa.field("day", pa.date32()),
    pa.field("took", pa.duration("us")), pa.field("kv", pa.map_(pa.string(), pa.int64())),
]


def typed(i: int) -> dict:
    return {"n": i, "score": i / 4, "ok": i % 2 == 0, "tag": f"t{i}", "when": T0 + timedelta(seconds=i),
            "naive": datetime(2025, 1, 1, 0, 0, i), "ids": [i, -i, 2**40], "info": {"a": "x", "b": [0.5, i]},
            "blob": bytes([0, 255, i]), "price": Decimal(f"{i}.125"), "day": date(2024, 2, 29),
            "took": timedelta(seconds=i, microseconds=250), "kv": [("k", i)]}


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_pass_through_values_round_trip_in_lines(tmp_path, fmt):
    records = [rec(i, **typed(i)) for i in range(3)]
    records.append(rec(9, **dict.fromkeys(typed(0))))  # all null
    twin = parquet_twin(tmp_path, records, EXTRA)
    lines = [encode_line(check_record(r, EXTRA), fmt) for r in records]
    o = orjson.loads(lines[1])
    tt = o if fmt == "jsonl" else o["twotower"]
    assert list(tt)[-len(EXTRA):] == [f.name for f in EXTRA]  # after the fixed columns
    assert tt["when"] == "2026-01-02T03:04:06.123456Z" and tt["blob"] == "AP8B" and tt["price"] == "1.125"
    assert tt["day"] == "2024-02-29" and tt["ids"] == [1, -1, 2**40] and tt["info"] == {"a": "x", "b": [0.5, 1.0]}
    got = [record_from_line(line, fmt, EXTRA) for line in lines]
    assert got == twin


@pytest.mark.parametrize(("fmt", "edit", "match"), [
    ("jsonl", lambda o: o.pop("completion"), r"missing column\(s\) \['completion'\]"),
    ("jsonl", lambda o: o.update(typo=1), r"unknown column\(s\) \['typo'\]"),
    ("jsonl", lambda o: o.update(seed="7"), "64-bit integer"),
    ("jsonl", lambda o: o.update(sample_index=None), "'sample_index' is required"),
    ("jsonl", lambda o: o.update(created_at="yesterday"), "not a timestamp"),
    ("openai", lambda o: o["response"]["body"]["choices"].append({}), "2 choices"),
    ("openai", lambda o: o["response"]["body"].update(object="embedding"), "object is 'embedding'"),
    ("openai", lambda o: o["twotower"].update(completion="x"), "that the OpenAI fields hold"),
    ("openai", lambda o: o["twotower"].pop("prompt"), r"missing column\(s\) \['prompt'\]"),
    ("openai", lambda o: o.pop("custom_id"), "custom_id is missing"),
    ("openai", lambda o: o["response"]["body"]["choices"][0].pop("index"), r"choices\[0\]\.index is missing"),
])
def test_record_from_line_is_strict(fmt, edit, match):
    o = orjson.loads(encode_line(check_record(rec(1)), fmt))
    edit(o)
    with pytest.raises(ValueError, match=match):
        record_from_line(orjson.dumps(o), fmt)


@pytest.mark.parametrize("bad", [b"", b"{", b"[1]", b'"x"', b"\xff"])
def test_record_from_line_refuses_non_objects(bad):
    for fmt in ("jsonl", "openai"):
        with pytest.raises(ValueError):
            record_from_line(bad, fmt)


def test_format_names():
    assert [shard_ext(f) for f in ("parquet", "jsonl", "openai")] == ["parquet", "jsonl", "jsonl"]
    with pytest.raises(ValueError, match="unknown output format 'csv'"):
        check_format("csv")


# ---- the -o - sink -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_stream_sink_writes_each_sample_once_in_its_format(fmt):
    out = io.BytesIO()
    sink = JsonlSink(out, format=fmt, extra_fields=EXTRA[:2])
    assert sink.add(rec(1, n=5, score=0.5))
    assert sink.add(rec(1, sample_index=1))  # another sample of the same prompt
    assert sink.is_done("1") and sink.is_done(sample_key("1", 1)) and not sink.is_done(sample_key("1", 2))
    with pytest.raises(ValueError, match="id '1' sample 1 written twice"):
        sink.add(rec(1, sample_index=1))
    with pytest.raises(ValueError, match="unknown output column"):
        sink.add(rec(2, other=1))
    sink.close()
    lines = out.getvalue().splitlines(keepends=True)
    assert len(lines) == 2 and sink.rows_committed == 2
    got = [record_from_line(line, fmt, EXTRA[:2]) for line in lines]
    assert [(g["id"], g["sample_index"], g["n"]) for g in got] == [("1", 0, 5), ("1", 1, None)]
    if fmt == "openai":
        assert [orjson.loads(x)["response"]["body"]["choices"][0]["index"] for x in lines] == [0, 1]


def test_stream_sink_refuses_parquet():
    with pytest.raises(ValueError, match="not 'parquet'"):
        JsonlSink(io.BytesIO(), format="parquet")
