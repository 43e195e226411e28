"""Reader: every input format, stable derived ids, and a corpus of bad rows that must not stop it."""

from __future__ import annotations

import gzip
import io
import sys

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_cli.io.reader import MAX_LINE_BYTES, InputError, PromptRow, RejectedRow, read_rows


def _write_lines(path, lines: list[bytes | str | dict]) -> None:
    out = []
    for x in lines:
        if isinstance(x, dict):
            x = orjson.dumps(x)
        out.append(x.encode() if isinstance(x, str) else x)
    path.write_bytes(b"\n".join(out) + b"\n")


def _split(rows):
    good = [r for r in rows if isinstance(r, PromptRow)]
    bad = [r for r in rows if isinstance(r, RejectedRow)]
    return good, bad


def test_jsonl_prompt_messages_and_overrides(tmp_path):
    p = tmp_path / "in.jsonl"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "u"}]
    _write_lines(p, [
        {"id": "a", "prompt": "Hello", "gamma": 0.5, "max_new_tokens": 32, "temperature": 1,
         "mode": "ar", "seed": 7, "extra": "ignored"},
        "",  # blank lines are skipped, but still count for line numbers
        {"id": 42, "messages": msgs},
        {"prompt": "no id", "gamma": None},
    ])
    good, bad = _split(list(read_rows(p)))
    assert bad == []
    a, b, c = good
    assert (a.id, a.line_no, a.prompt, a.messages, a.source_format) == ("a", 1, "Hello", None, "jsonl")
    assert a.overrides == {"gamma": 0.5, "max_new_tokens": 32, "temperature": 1.0, "mode": "ar", "seed": 7}
    assert isinstance(a.overrides["temperature"], float)
    assert (b.id, b.line_no, b.prompt) == ("42", 3, None)
    assert b.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert orjson.loads(b.prompt_text()) == b.messages
    assert c.id.startswith("h-") and c.line_no == 4 and c.overrides == {}


def test_prompt_and_id_field_mapping_jsonl(tmp_path):
    p = tmp_path / "in.jsonl"
    _write_lines(p, [{"question": "Q1", "uid": "u1"}, {"prompt": "not mapped"}])
    good, bad = _split(list(read_rows(p, prompt_field="question", id_field="uid")))
    assert [(r.id, r.prompt) for r in good] == [("u1", "Q1")]
    assert bad[0].reason == "missing 'question' or 'messages'"


def test_parquet_mapped_columns_multiple_batches(tmp_path):
    n = 2500  # > one reader batch (1024) and several row groups
    table = pa.table({
        "text": [f"prompt {i}" for i in range(n)],
        "key": list(range(n)),
        "gamma": [None if i % 2 else 0.25 for i in range(n)],
        "unused": ["x"] * n,
    })
    p = tmp_path / "in.parquet"
    pq.write_table(table, p, row_group_size=700)
    rows = list(read_rows(p, prompt_field="text", id_field="key"))
    good, bad = _split(rows)
    assert bad == [] and len(good) == n
    assert [r.id for r in good[:3]] == ["0", "1", "2"]
    assert good[2499].line_no == 2500 and good[2499].prompt == "prompt 2499"
    assert good[0].overrides == {"gamma": 0.25} and good[1].overrides == {}
    assert {r.source_format for r in good} == {"parquet"}


def test_parquet_detected_by_magic_and_bad_rows(tmp_path):
    table = pa.table({"prompt": ["ok", None, "", "ok2"], "id": ["a", "b", "c", "a"]})
    p = tmp_path / "data.bin"  # no .parquet suffix: detected by magic bytes
    pq.write_table(table, p)
    good, bad = _split(list(read_rows(p)))
    assert [r.id for r in good] == ["a"]
    assert [(r.line_no, r.id, r.reason) for r in bad] == [
        (2, "b", "missing 'prompt' or 'messages'"),
        (3, "c", "'prompt' is empty"),
        (4, "a", "duplicate id"),
    ]


def test_parquet_messages_column(tmp_path):
    msgs = pa.array(
        [[{"role": "user", "content": "hi"}], None, [{"role": "user", "content": "yo"}]],
        pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
    )
    p = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": msgs, "prompt": [None, "plain", None]}), p)
    rows = list(read_rows(p))
    assert [r.messages for r in rows] == [[{"role": "user", "content": "hi"}], None,
                                          [{"role": "user", "content": "yo"}]]
    assert rows[1].prompt == "plain"


def test_no_stdin_is_input_error(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(InputError, match="no standard input"):
        read_rows("-")


def test_parquet_without_prompt_column_is_input_error(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a"]}), p)
    with pytest.raises(InputError, match="no 'prompt' or 'messages' column"):
        read_rows(p)
    q = tmp_path / "fake.parquet"
    q.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet"):
        read_rows(q)


def test_missing_or_unreadable_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="cannot read"):
        read_rows(tmp_path)  # a directory
    with pytest.raises(InputError):
        read_rows(tmp_path / "nope.jsonl", limit=-1)


class _Stdin:
    """Stands in for sys.stdin: only `.buffer` (binary) is used, as with a real pipe."""

    def __init__(self, data: bytes):
        self.buffer = io.BufferedReader(io.BytesIO(data))


def test_stdin_binary_lines_with_invalid_utf8(monkeypatch):
    data = b'{"prompt": "one"}\n{"prompt": "caf\xe9"}\n{"prompt": "three"}'  # no final newline
    monkeypatch.setattr(sys, "stdin", _Stdin(data))
    rows = list(read_rows("-"))
    assert [type(r).__name__ for r in rows] == ["PromptRow", "RejectedRow", "PromptRow"]
    assert rows[1].line_no == 2 and rows[1].reason.startswith("invalid UTF-8")
    assert "\\xe9" in rows[1].raw
    assert rows[2].prompt == "three"


def test_stdin_plain_bytesio_and_gzip_and_parquet(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.BytesIO(gzip.compress(b'{"prompt": "zipped"}\n')))
    assert [r.prompt for r in read_rows("-")] == ["zipped"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["from parquet"]}), buf)
    monkeypatch.setattr(sys, "stdin", _Stdin(buf.getvalue()))
    assert [r.prompt for r in read_rows("-")] == ["from parquet"]


def test_openai_batch_lines_detected_per_line(tmp_path):
    p = tmp_path / "batch.jsonl"
    _write_lines(p, [
        {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 64, "temperature": 0.7, "seed": 3}},
        {"prompt": "plain row in the same file", "id": "p1"},
        {"custom_id": "r2", "body": {"prompt": "complete me", "max_completion_tokens": 5}},
        {"custom_id": "r3", "body": "nope"},
        {"custom_id": "r4", "body": {"prompt": "x", "max_tokens": 0}},
    ])
    good, bad = _split(list(read_rows(p)))
    assert [(r.id, r.source_format) for r in good] == [("r1", "openai"), ("p1", "jsonl"), ("r2", "openai")]
    assert good[0].messages == [{"role": "user", "content": "Hi"}]
    assert good[0].overrides == {"max_new_tokens": 64, "temperature": 0.7, "seed": 3}
    assert good[2].prompt == "complete me" and good[2].overrides == {"max_new_tokens": 5}
    assert [(r.line_no, r.id) for r in bad] == [(4, "r3"), (5, "r4")]
    assert "body" in bad[0].reason and "max_new_tokens" in bad[1].reason


def test_derived_ids_stable_and_distinct(tmp_path):
    p = tmp_path / "in.jsonl"
    rows = [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "same", "gamma": 0.5},
            {"prompt": "same", "gamma": 0.5}, {"messages": [{"role": "user", "content": "same"}]}]
    _write_lines(p, rows)
    first = [r.id for r in read_rows(p)]
    assert first == [r.id for r in read_rows(p)]
    assert len(set(first)) == 5
    assert first[1] == first[0] + "-1" and first[3] == first[2] + "-1"
    # Editing the file elsewhere does not change a row's id; int vs float override neither.
    _write_lines(p, [{"prompt": "new first row"}, {"prompt": "same", "gamma": 0.5}, {"prompt": "same"}])
    again = [r.id for r in read_rows(p)]
    assert again[1:] == [first[2], first[0]]
    _write_lines(p, [{"prompt": "t", "temperature": 1}, {"prompt": "t", "temperature": 1.0}])
    a, b = [r.id for r in read_rows(p)]
    assert b == a + "-1"


BAD_CORPUS: list[tuple[bytes, str]] = [
    (b'{"prompt": "unterminated', "malformed JSON"),
    (b'["a list"]', "not a JSON object"),
    (b'{"id": "x1"}', "missing 'prompt' or 'messages'"),
    (b'{"prompt": ""}', "'prompt' is empty"),
    (b'{"prompt": "   "}', "'prompt' is empty"),
    (b'{"prompt": 12}', "'prompt' must be a string"),
    (b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "both"),
    (b'{"messages": []}', "non-empty list"),
    (b'{"messages": "hello"}', "non-empty list"),
    (b'{"messages": [{"role": "user"}]}', "messages[0]"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0]"),
    (b'{"messages": ["hi"]}', "messages[0]"),
    (b'{"prompt": "a", "gamma": 1.5}', "gamma must be in [0, 1]"),
    (b'{"prompt": "a", "gamma": true}', "gamma must be a finite number"),
    (b'{"prompt": "a", "gamma": "0.5"}', "gamma must be a finite number"),
    (b'{"prompt": "a", "temperature": -1}', "temperature must be >= 0"),
    (b'{"prompt": "a", "max_new_tokens": 0}', "max_new_tokens must be a positive integer"),
    (b'{"prompt": "a", "max_new_tokens": true}', "max_new_tokens must be a positive integer"),
    (b'{"prompt": "a", "max_new_tokens": 8.0}', "max_new_tokens must be a positive integer"),
    (b'{"prompt": "a", "mode": "beam"}', "mode must be one of"),
    (b'{"prompt": "a", "seed": -3}', "seed must be a non-negative integer"),
    (b'{"prompt": "a", "seed": 18446744073709551615}', "seed must fit in 64 bits"),
    (b'{"prompt": "a", "seed": 99999999999999999999}', "seed must be a non-negative integer"),
    (b'{"prompt": "a", "id": true}', "'id' must be a string or an integer"),
    (b'{"prompt": "a", "id": ""}', "'id' is empty"),
    (b'{"prompt": "caf\xc3"}', "invalid UTF-8"),
    (b'\xff\xfe{"prompt": "a"}', "invalid UTF-8"),
    (b'{"prompt": "dup", "id": "good-1"}', "duplicate id"),
]


def test_bad_input_corpus(tmp_path):
    """Good and bad rows interleaved: each bad row rejected with its reason and line, all good kept."""
    lines: list[bytes] = []
    expected_bad: list[tuple[int, str]] = []
    for i, (bad, reason) in enumerate(BAD_CORPUS):
        lines.append(orjson.dumps({"id": f"good-{i}", "prompt": f"fine {i}"}))
        lines.append(bad)
        expected_bad.append((len(lines), reason))
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = _split(list(read_rows(p)))
    assert [r.id for r in good] == [f"good-{i}" for i in range(len(BAD_CORPUS))]
    assert [r.line_no for r in good] == list(range(1, 2 * len(BAD_CORPUS), 2))
    assert len(bad) == len(expected_bad)
    for r, (line_no, reason) in zip(bad, expected_bad, strict=True):
        assert r.line_no == line_no, r
        assert reason in r.reason, (reason, r)
        assert r.raw
    ids = {r.reason: r.id for r in bad}
    assert ids["duplicate id"] == "good-1"
    assert ids["invalid override: gamma must be in [0, 1], got 1.5"] is None


def test_rejected_row_keeps_valid_id(tmp_path):
    p = tmp_path / "in.jsonl"
    _write_lines(p, [{"id": "k", "prompt": "a", "gamma": 2}, {"id": "k", "prompt": "a"}])
    bad, good = list(read_rows(p))
    assert bad.id == "k" and isinstance(bad, RejectedRow)
    assert good.id == "k" and isinstance(good, PromptRow)  # a rejected row does not claim its id


def test_overlong_line_rejected_without_stopping(tmp_path, monkeypatch):
    monkeypatch.setattr("twotower_cli.io.reader.MAX_LINE_BYTES", 64)
    p = tmp_path / "in.jsonl"
    _write_lines(p, [{"prompt": "x" * 500}, {"prompt": "short"}])
    bad, good = list(read_rows(p))
    assert bad.reason == "line longer than 64 bytes" and bad.line_no == 1
    assert good.prompt == "short" and good.line_no == 2
    assert MAX_LINE_BYTES == 16 << 20


def test_limit_counts_input_rows(tmp_path, monkeypatch):
    p = tmp_path / "in.jsonl"
    _write_lines(p, [{"prompt": "a"}, "{bad", "", {"prompt": "b"}, {"prompt": "c"}])
    rows = list(read_rows(p, limit=3))
    assert [r.line_no for r in rows] == [1, 2, 4]
    assert list(read_rows(p, limit=0)) == []
    # With stdin the reader stops right after the limit: the rest of the pipe stays unread.
    stdin = _Stdin(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    monkeypatch.setattr(sys, "stdin", stdin)
    assert [r.prompt for r in read_rows("-", limit=1)] == ["a"]
    assert stdin.buffer.read() == b'{"prompt": "b"}\n{"prompt": "c"}\n'


def test_truncated_gzip_yields_rows_before_it_then_reports(tmp_path):
    data = gzip.compress(b"".join(orjson.dumps({"id": f"r{i}", "prompt": f"p{i}"}) + b"\n" for i in range(300)))
    p = tmp_path / "in.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    rows = read_rows(p)
    got = list(rows)  # no exception while iterating: the run commits these
    assert 0 < len(got) < 300 and [r.id for r in got] == [f"r{i}" for i in range(len(got))]
    with pytest.raises(InputError, match=rf"in.jsonl.gz: .* the {len(got)} row\(s\) read before it were kept"):
        _ = rows.exhausted


def test_parquet_invalid_utf8_value_rejects_its_row_only(tmp_path):
    raw = [b"one", b"caf\xc3", b"three"]
    as_string = pa.Array.from_buffers(pa.string(), 3, pa.array(raw, pa.binary()).buffers())
    p = tmp_path / "u.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": as_string}), p)
    rows = read_rows(p)
    good, bad = _split(list(rows))
    assert [r.prompt for r in good] == ["one", "three"] and rows.exhausted is True
    assert bad[0].line_no == 2 and "'prompt' holds invalid UTF-8" in bad[0].reason and '"b"' in bad[0].raw
