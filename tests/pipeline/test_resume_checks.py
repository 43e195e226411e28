"""Resume checks: the fingerprint covers the field mapping and dtype, rows whose input changed are
reported, shards are verified whole before they are adopted, the done set is compact and exact."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from test_loop import Echo, cfg_for, ids, source

from twotower_cli.config import DecodeParams
from twotower_cli.io.rundir import DoneSet, FingerprintMismatch, RunDir, id_hash, id_hashes
from twotower_cli.io.schema import PromptRow
from twotower_cli.pipeline import INPUT_CHANGED, Decoded, generate, input_hash


@pytest.mark.parametrize("change", [{"id_field": "key"}, {"prompt_field": "text"}, {"dtype": "bfloat16"}])
def test_fingerprint_covers_field_mapping_and_dtype(tmp_path, change):
    src, out = source(tmp_path), tmp_path / "out"
    generate(cfg_for(src, out), Echo())
    with pytest.raises(FingerprintMismatch) as e:
        generate(cfg_for(src, out, **change), Echo())
    assert next(iter(change)) in str(e.value)


def test_input_hash_is_the_input_and_its_settings_not_the_id():
    d = DecodeParams()
    a = PromptRow("a", 1, "hi", None)
    assert input_hash(a, d) == input_hash(PromptRow("b", 7, "hi", None), d)
    assert input_hash(a, d) != input_hash(PromptRow("a", 1, "hi!", None), d)
    assert input_hash(a, d) != input_hash(PromptRow("a", 1, "hi", None, {"gamma": 0.5}), d)
    assert input_hash(a, d) == input_hash(PromptRow("a", 1, "hi", None, {"gamma": d.gamma}), d)  # same settings
    assert input_hash(a, d) != input_hash(PromptRow("a", 1, None, [{"role": "user", "content": "hi"}]), d)
    assert len(input_hash(a, d)) == 16


def test_changed_input_under_a_done_id_is_reported_not_kept_silently(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"
    generate(cfg_for(src, out), Echo())
    t = pq.read_table(sorted(out.glob("part-*.parquet"))[0])
    row = PromptRow("r0", 1, "p0", None)
    assert t["input_hash"][0].as_py() == input_hash(row, DecodeParams())
    # r1's prompt changes, r2 gets a per-row override; a line is inserted at the top too
    lines = src.read_bytes().splitlines()
    lines[1] = orjson.dumps({"id": "r1", "prompt": "p1 edited"})
    lines[2] = orjson.dumps({"id": "r2", "prompt": "p2", "temperature": 0.7})
    src.write_bytes(b"\n".join([orjson.dumps({"id": "new", "prompt": "n"}), *lines]) + b"\n")
    errors_before = (out / ".errors.jsonl").read_text().splitlines()
    notes: list[str] = []
    dec = Echo()
    s = generate(cfg_for(src, out), dec, notes=notes.append)
    assert s["rows_input_changed"] == 2 and dec.pulled == ["new", "r4"] and s["rows_written"] == 1
    assert [n for n in notes if "another input" in n] == [notes[-1]] and notes[-1].startswith("2 row(s)")
    recs = [orjson.loads(x) for x in (out / ".errors.jsonl").read_text().splitlines()]
    changed = [r for r in recs if r["reason"] == INPUT_CHANGED]
    assert sorted(r["id"] for r in changed) == ["r1", "r2"] and changed[0]["raw"]
    # the old rejects were not logged again although every line moved down by one
    assert len(recs) == len(errors_before) + 2
    assert s["rows_rejected"] == 2  # the reader's and the decoder's, as on the first run
    s = generate(cfg_for(src, out), Echo(), notes=notes.append)  # reported again, logged once
    assert s["rows_input_changed"] == 2 and len((out / ".errors.jsonl").read_text().splitlines()) == len(recs)
    kept = {r["id"]: r["completion"] for r in pq.read_table(sorted(out.glob("part-*.parquet"))[0]).to_pylist()}
    assert kept["r1"] == "P1"  # kept, and reported (not silently regenerated)


def _corrupt_column(path, column):
    md = pq.ParquetFile(path).metadata
    idx = md.schema.to_arrow_schema().names.index(column)
    off = md.row_group(0).column(idx).data_page_offset
    data = bytearray(path.read_bytes())
    for k in range(off + 20, off + 40):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def test_resume_verifies_every_column_of_a_shard_it_adopts(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, {"m": 1}, rows_per_shard=3) as rd:
        for i in range(7):
            rd.add({"id": str(i), "prompt": f"p{i}" * 50, "completion": f"c{i}" * 50})
    _corrupt_column(out / "part-00001.parquet", "completion")
    assert pq.read_table(out / "part-00001.parquet", columns=["id"]).num_rows == 3  # the id column still reads
    pq.write_table(pq.read_table(out / "part-00002.parquet", columns=["id"]), out / "part-00002.parquet")
    rd = RunDir(out, {"m": 1})
    assert sorted(rd.done_ids) == ["0", "1", "2"]
    assert any("part-00001.parquet does not read whole" in n and ".part-00001.parquet.corrupt" in n for n in rd.notes)
    assert any("part-00002.parquet does not read whole" in n for n in rd.notes)
    assert (out / ".part-00001.parquet.corrupt").exists() and not (out / "part-00001.parquet").exists()
    for i in range(3, 7):
        rd.add({"id": str(i), "prompt": "p", "completion": "c"})
    rd.close()
    assert sorted(ids(out)) == [str(i) for i in range(7)]  # the directory reads, every row once


def test_resume_refuses_a_row_count_other_than_recorded(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, {"m": 1}, rows_per_shard=3) as rd:
        for i in range(3):
            rd.add({"id": str(i), "prompt": "p", "completion": "c"})
    m = orjson.loads((out / ".manifest.json").read_bytes())
    m["shards"][0]["rows"] = 5
    (out / ".manifest.json").write_bytes(orjson.dumps(m))
    rd = RunDir(out, {"m": 1})
    assert len(rd.done_ids) == 0 and any("records 5" in n for n in rd.notes)
    rd.close()


def test_done_set_hash_hits_are_confirmed_against_real_ids():
    groups = {"g0": ["a", "b"], "g1": ["c"]}
    d = DoneSet(load_group=groups.__getitem__)
    d.add_group("g0", id_hashes(["a", "b"]), np.array([11, 12], dtype=np.uint64))
    # g1 holds "c", but claims the hash of "zz": a collision stand-in (a hash hit with another id)
    d.add_group("g1", np.array([id_hash("zz")], dtype=np.uint64))
    d.freeze()
    assert "a" in d and "b" in d and d.lookup("b") == 12
    assert "zz" not in d  # the hash is there, the id is not: never skipped
    assert "q" not in d and d.lookup("q") is None
    d.update(["q"])
    assert "q" in d and len(d) == 4 and d.nbytes() == 3 * 20


def test_done_set_counts_an_id_in_two_shards_once():
    groups = {"g0": ["a", "b"], "g1": ["b"]}
    d = DoneSet(load_group=groups.__getitem__)
    for k, v in groups.items():
        d.add_group(k, id_hashes(v))
    d.freeze()
    assert d.duplicates == 1 and len(d) == 2 and sorted(d) == ["a", "b"]


def _edit(src):
    """r1's prompt changes, r2 gets a per-row override, r3 is removed, a new row comes first."""
    lines = src.read_bytes().splitlines()
    lines[1] = orjson.dumps({"id": "r1", "prompt": "p1 edited"})
    lines[2] = orjson.dumps({"id": "r2", "prompt": "p2", "temperature": 0.7})
    del lines[3]
    src.write_bytes(b"\n".join([orjson.dumps({"id": "new", "prompt": "n"}), *lines]) + b"\n")


def _rows(out):
    return [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_regenerate_changed_decodes_them_again_and_keeps_one_row_per_id(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"
    generate(cfg_for(src, out), Echo())
    _edit(src)
    notes: list[str] = []
    dec = Echo()
    s = generate(cfg_for(src, out, regenerate_changed=True), dec, notes=notes.append)
    assert s["rows_input_changed"] == 2 and s["rows_regenerated"] == 2
    assert sorted(dec.pulled) == ["new", "r1", "r2", "r4"] and s["rows_written"] == 3  # r4: the decoder's reject
    rows = _rows(out)
    got = {r["id"]: r["completion"] for r in rows}
    assert len(rows) == len(got)  # one row per id: the old rows left their shard first
    assert got["r1"] == "P1 EDITED" and got["new"] == "N"
    assert any("2 regenerated" in n for n in notes)
    s = generate(cfg_for(src, out, regenerate_changed=True), Echo())  # their input hashes match now
    assert s["nothing_to_do"] and s["rows_input_changed"] == 0


def test_rows_no_longer_in_the_input_are_counted_logged_and_kept(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"
    generate(cfg_for(src, out), Echo())
    _edit(src)
    notes: list[str] = []
    s = generate(cfg_for(src, out, limit=3), Echo(), notes=notes.append)
    assert s["rows_not_in_input"] == 0  # the input was not read whole: nothing can be said
    s = generate(cfg_for(src, out), Echo(), notes=notes.append)
    assert s["rows_not_in_input"] == 1 and any("no longer in the input" in n for n in notes)
    recs = [orjson.loads(x) for x in (out / ".errors.jsonl").read_text().splitlines()]
    gone = [r for r in recs if "no longer in the input" in r["reason"]]
    assert [r["id"] for r in gone] == ["r3"]
    assert "r3" in {r["id"] for r in _rows(out)}  # never deleted
    s = generate(cfg_for(src, out), Echo())  # reported again, logged once
    assert s["rows_not_in_input"] == 1
    assert len((out / ".errors.jsonl").read_text().splitlines()) == len(recs)


class Samples(Echo):
    """Each admitted sample -> a record."""

    def decode(self, rows, signals, is_done):
        for r in rows:
            for k in r.samples:
                self.pulled.append((r.id, k))
                yield Decoded({"id": r.id, "sample_index": k, "prompt": r.prompt, "completion": f"{r.prompt}#{k}",
                               "completion_tokens": 1}, 1)


def test_samples_resume_per_key_and_a_lower_n_leaves_orphans(tmp_path):
    src, out = source(tmp_path), tmp_path / "out"
    d3 = DecodeParams(temperature=1.0, n=3)
    dec = Samples()
    s = generate(cfg_for(src, out, defaults=d3), dec)
    assert s["rows_written"] == 10 * 3 and len(set(dec.pulled)) == 30
    dec = Samples()
    s = generate(cfg_for(src, out, defaults=d3.replace(n=4)), dec)  # one more sample each
    assert sorted({k for _, k in dec.pulled}) == [3] and s["rows_written"] == 10
    s = generate(cfg_for(src, out, defaults=d3.replace(n=2)), Samples())
    assert s["nothing_to_do"] and s["rows_not_in_input"] == 2 * 10  # samples 2 and 3 of every row
    keys = [(r["id"], r["sample_index"]) for r in _rows(out)]
    assert len(keys) == len(set(keys)) == 10 * 4
