"""The shared run loop (`pipeline.generate`) with stand-in decoders, and the record it writes.

No model: a decoder here turns each admitted row into a record directly, so these tests pin
down what the loop owns (filters, resume, rejects, signals, commits, the summary) for the local
and the Ray run alike.
"""

from __future__ import annotations

import signal
import time
from dataclasses import fields

import orjson
import pyarrow.dataset as pads
import pytest

from twotower_cli.engine import Result
from twotower_cli.engine.request import Stats
from twotower_cli.io.partition import Partition
from twotower_cli.io.schema import COLUMNS, STATS_COLUMNS, PromptRow, RejectedRow, check_record
from twotower_cli.pipeline import Decoded, Decoder, RunConfig, generate, output_record

STATS = Stats(mode="diffusion", gamma=0.8, block_size=4, steps_per_block=4, temperature=0.0, seed=7,
              prompt_tokens=5, completion_tokens=6, decoded_tokens=8, denoiser_steps=3, context_forwards=2,
              blocks=2, finish_reason="eos", latency_s=0.25)


def test_every_stats_column_is_an_attribute_of_stats():
    for name in STATS_COLUMNS:
        assert hasattr(STATS, name), name
    assert {f.name for f in fields(Stats)} - set(STATS_COLUMNS) == {"decoded_tokens"}  # not an output column
    types = {n: t for n, t, _ in COLUMNS}
    for name in STATS_COLUMNS:  # and each value fits its column's type
        check_record({"id": "x", "prompt": "p", "completion": "c", name: getattr(STATS, name)})
        assert name in types


class CharTokenizer:
    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(ord("a") + t) for t in tokens)


def test_output_record_from_a_result():
    row = PromptRow("r1", 1, None, [{"role": "user", "content": "hi"}])
    rec = output_record(Result("r1", [0, 1, 2, 99], STATS, meta=row), CharTokenizer(), [99], "tiny@sha256:01")
    assert rec["completion"] == "abc"  # the EOS ends the completion, it is not part of its text
    assert rec["prompt"] == orjson.dumps(row.messages).decode() and rec["model"] == "tiny@sha256:01"
    assert rec["tokens_per_step"] == 2.0 and rec["denoiser_steps"] == 3 and rec["mode"] == "diffusion"
    assert set(check_record(rec)) == {n for n, _, _ in COLUMNS}


# ---- the loop -------------------------------------------------------------------------------------


class Echo(Decoder):
    """Each row -> a record at once; a row whose prompt is "reject" is rejected by the decoder."""

    def __init__(self, on_row=None):
        self.counters = dict.fromkeys(("prefill_calls", "prefill_tokens", "prefill_padded_tokens",
                                       "denoiser_calls", "context_calls"), 0)
        self.pulled: list[str] = []
        self.on_row = on_row

    def decode(self, rows, signals, is_done):
        for r in rows:
            self.pulled.append(r.id)
            if self.on_row:
                self.on_row(self, r, signals)
            if r.prompt == "reject":
                yield RejectedRow(r.line_no, r.id, "decoder says no")
                continue
            self.counters["denoiser_calls"] += 1
            yield Decoded({"id": r.id, "prompt": r.prompt, "completion": r.prompt.upper(), "completion_tokens": 2}, 1)


def source(tmp_path, n=10, extra=b""):
    p = tmp_path / "in.jsonl"
    lines = [orjson.dumps({"id": f"r{i}", "prompt": "reject" if i == 4 else f"p{i}"}) for i in range(n)]
    p.write_bytes(b"\n".join(lines) + b"\n{bad json\n" + extra)
    return p


def cfg_for(src, out, **kw):
    return RunConfig(source=str(src), out_dir=out, model=None, tokenizer=None, model_name="m", model_fingerprint="f",
                     rows_per_shard=3, **kw)


def ids(out):
    return sorted(pads.dataset(sorted(str(p) for p in out.glob("part-*.parquet"))).to_table(columns=["id"])["id"]
                  .to_pylist())


def test_loop_commits_rejects_resumes_and_summarizes(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"
    seen = []
    s = generate(cfg_for(src, out, limit=8), Echo(), on_result=lambda p: seen.append(p.rows))
    assert s["rows_written"] == 7 and s["rows_rejected"] == 1 and s["completion_tokens"] == 14
    assert s["mean_tokens_per_step"] == 2.0 and s["denoiser_calls"] == 7 and s["exit_code"] == 0
    # --limit stopped the read with input left: not complete (nothing was interrupted either)
    assert not s["complete"] and not s["input_exhausted"] and not s["interrupted"]
    assert "shard" not in s and "error" not in s and s["rows_in_output"] == 7
    assert orjson.loads((out / ".manifest.json").read_bytes())["complete"] is False
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 7]  # once the decoder is made, after each row, and at the end
    assert ids(out) == sorted(f"r{i}" for i in range(8) if i != 4)
    dec = Echo()
    s = generate(cfg_for(src, out), dec)  # resume: only the rest is decoded; rejects are redone
    assert dec.pulled == ["r4", "r8", "r9"] and s["rows_skipped_done"] == 7
    assert s["rows_written"] == 2 and s["rows_rejected"] == 2  # the decoder's and the reader's
    assert len((out / ".errors.jsonl").read_text().splitlines()) == 2  # each logged once
    assert orjson.loads((out / ".manifest.json").read_bytes())["complete"] is True
    assert s["complete"] and s["input_exhausted"] and not s["nothing_to_do"]


def test_loop_partition_keeps_its_rows(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"
    got = []
    for i in range(2):
        dec = Echo()
        s = generate(cfg_for(src, out, partition=Partition(i, 2)), dec)
        assert s["shard"]["rows_other_shards"] + len(dec.pulled) + s["rows_rejected"] - ("r4" in dec.pulled) == 11
        got += dec.pulled
    assert sorted(got) == sorted(f"r{i}" for i in range(10))


def test_first_signal_takes_no_new_rows_and_exits_3(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"

    def on_row(dec, r, signals):
        if r.id == "r2":
            signal.raise_signal(signal.SIGINT)

    dec = Echo(on_row)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background by a shell
    s = generate(cfg_for(src, out), dec)
    assert dec.pulled == ["r0", "r1", "r2"]  # the row in flight is finished, no row after it is read
    assert s["exit_code"] == 3 and s["interrupted"] and not s["complete"] and s["rows_written"] == 3
    assert ids(out) == ["r0", "r1", "r2"]
    assert orjson.loads((out / ".manifest.json").read_bytes())["complete"] is False
    assert signal.getsignal(signal.SIGINT) is before  # restored
    s = generate(cfg_for(src, out), Echo())  # the same command resumes
    assert s["rows_skipped_done"] == 3 and s["rows_written"] == 6 and s["exit_code"] == 0


def test_second_signal_cuts_an_interruptible_wait_short(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"

    def on_row(dec, r, signals):
        if r.id == "r1":
            signal.raise_signal(signal.SIGTERM)
            with signals.interruptible():  # a decoder waiting for its next batch
                signal.raise_signal(signal.SIGTERM)
                time.sleep(30)
            pytest.fail("the second signal did not interrupt the wait")

    s = generate(cfg_for(src, out), Echo(on_row))
    assert s["exit_code"] == 3 and s["interrupted"] and s["rows_written"] == 1 and ids(out) == ["r0"]


def test_a_failed_decoder_commits_what_it_delivered_and_exits_1(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"

    class Failing(Echo):
        def decode(self, rows, signals, is_done):
            for item in super().decode(rows, signals, is_done):
                yield item
                if len(self.pulled) == 2:
                    self.error = "the Ray job failed: boom"
                    return

        def summary(self):
            return {"ray": {"batches": 1}}

    s = generate(cfg_for(src, out), Failing())
    assert list(s)[-2:] == ["ray", "error"]  # the decoder's entries, then the error, as printed
    assert s["error"] == "the Ray job failed: boom" and s["exit_code"] == 1 and s["complete"] is False
    assert ids(out) == ["r0", "r1"]
    assert orjson.loads((out / ".manifest.json").read_bytes())["complete"] is False
