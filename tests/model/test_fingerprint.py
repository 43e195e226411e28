"""The checkpoint fingerprint covers the weights' content, not their path, and the per-user digest
cache behind it: hits read nothing, a changed file is seen, a broken or unwritable cache costs a
rehash and never the run, and nothing is written next to the checkpoint. No torch here."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest

from twotower_cli.model import content_hash
from twotower_cli.model.files import CheckpointError, default_checkpoint, fingerprint


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache directory: never the user's real one."""
    d = tmp_path / "cache"
    monkeypatch.setenv(content_hash.ENV_DIR, str(d))
    return d


def write_weights(path: Path, values: list[float]) -> Path:
    """A minimal safetensors file: one float32 vector."""
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def make_ckpt(root: Path, values=(1.0, 2.0, 3.0, 4.0)) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"vocab_size": 8}))
    write_weights(root / "model.safetensors", list(values))
    return root


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def cache_entries(cache: Path) -> dict:
    return json.loads((cache / content_hash.CACHE_FILE).read_text())["entries"]


# ---- what the fingerprint follows -------------------------------------------------------------------


def test_moved_or_copied_checkpoint_keeps_its_fingerprint(tmp_path):
    a = make_ckpt(tmp_path / "a")
    fp = fingerprint(a)
    assert len(fp) == 16 and fingerprint(a) == fp
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)  # a copy: another inode, another mtime
    assert fingerprint(b) == fp
    moved = tmp_path / "moved"
    os.rename(b, moved)
    assert fingerprint(moved) == fp
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(a / "config.json", linked)
    os.link(a / "model.safetensors", linked / "model.safetensors")  # the same inode: a cache hit
    assert fingerprint(linked) == fp


def test_same_shape_retrain_changes_the_fingerprint(tmp_path):
    a = make_ckpt(tmp_path / "a")
    fp = fingerprint(a)
    retrained = make_ckpt(tmp_path / "b", values=(1.0, 2.0, 3.0, 4.5))  # same header, same size
    assert (retrained / "model.safetensors").stat().st_size == (a / "model.safetensors").stat().st_size
    assert fingerprint(retrained) != fp
    write_weights(a / "model.safetensors", [1.0, 2.0, 3.0, 4.5])  # retrained in place: a new mtime
    assert fingerprint(a) == fingerprint(retrained) != fp


def test_in_place_rewrite_with_size_and_mtime_restored_is_seen(tmp_path):
    """os.utime puts the mtime back, but not the ctime (it sets it to now): the key differs. (A change
    that keeps size, mtime and ctime, e.g. writing the block device, is not seen: module docstring.)"""
    a = make_ckpt(tmp_path / "a")
    w = a / "model.safetensors"
    fp = fingerprint(a)
    before = w.stat()
    write_weights(w, [1.0, 2.0, 3.0, 9.0])
    os.utime(w, ns=(before.st_atime_ns, before.st_mtime_ns))
    for _ in range(100):  # the kernel's ctime clock is coarse (a few ms): wait for it to tick
        if w.stat().st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)
        os.utime(w, ns=(before.st_atime_ns, before.st_mtime_ns))
    now = w.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert fingerprint(a) != fp


def test_config_and_tokenizer_files_still_count(tmp_path):
    a = make_ckpt(tmp_path / "a")
    fp = fingerprint(a)
    (a / "tokenizer_config.json").write_text("{}")
    fp2 = fingerprint(a)
    assert fp2 != fp
    (a / "config.json").write_text(json.dumps({"vocab_size": 9}))
    assert fingerprint(a) not in (fp, fp2)


def test_the_embedded_checkpoint_has_a_fingerprint_and_caches_it(cache):
    root = default_checkpoint()
    if root is None:
        pytest.skip("this build has no embedded model")
    fp = fingerprint(root)
    assert fingerprint(root) == fp and len(fp) == 16
    assert len(cache_entries(cache)) == 1


# ---- the cache ----------------------------------------------------------------------------------------


def test_a_cache_hit_reads_no_weights_and_nothing_is_written_next_to_the_checkpoint(tmp_path, cache, monkeypatch):
    a = make_ckpt(tmp_path / "a")
    before = snapshot(a)
    fp = fingerprint(a)
    (entry,) = cache_entries(cache).values()
    assert entry["path"].endswith("model.safetensors")

    def no_reading(f):
        raise AssertionError("a cache hit read the weights")

    monkeypatch.setattr(content_hash, "hash_stream", no_reading)
    assert fingerprint(a) == fp
    assert snapshot(a) == before  # nothing added or touched in the checkpoint directory


def test_a_missing_cache_entry_is_computed_once(tmp_path, monkeypatch):
    a = make_ckpt(tmp_path / "a")
    calls = []
    real = content_hash.hash_stream
    monkeypatch.setattr(content_hash, "hash_stream", lambda f: calls.append(1) or real(f))
    fp = fingerprint(a)
    assert fingerprint(a) == fingerprint(a) == fp and len(calls) == 1


CORRUPT = {
    "not-json": b"\x00\xffnot json",
    "empty": b"",
    "truncated": b'{"version": 1, "entries": {"1:2',
    "a-list": b"[1, 2, 3]",
    "other-version": b'{"version": 99, "entries": {}}',
    "entries-a-list": b'{"version": 1, "entries": []}',
    "bad-digest": None,  # filled in by the test: the right key, a digest that is not hex
    "deep": b"[" * 100_000,
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_a_corrupt_cache_is_recomputed_and_replaced(tmp_path, cache, kind):
    a = make_ckpt(tmp_path / "a")
    fp = fingerprint(a)
    f = cache / content_hash.CACHE_FILE
    data = CORRUPT[kind]
    if data is None:
        (key,) = cache_entries(cache)
        data = json.dumps({"version": 1, "entries": {key: {"digest": "../../etc/passwd"}}}).encode()
    f.write_bytes(data)
    assert fingerprint(a) == fp
    assert len(cache_entries(cache)) == 1  # rewritten whole


def test_a_forged_cache_entry_is_trusted(tmp_path, cache):
    """The cache is trusted on a key match (which is why it lives in the user's own directory)."""
    a = make_ckpt(tmp_path / "a")
    fp = fingerprint(a)
    entries = cache_entries(cache)
    (key,) = entries
    entries[key]["digest"] = "0" * 64
    (cache / content_hash.CACHE_FILE).write_text(json.dumps({"version": 1, "entries": entries}))
    assert fingerprint(a) != fp


def _fail(*a, **k):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


@pytest.mark.parametrize("how", ["parent-is-a-file", "read-only-fs", "no-home", "chmod-0500"])
def test_an_unwritable_cache_does_not_fail_the_run(tmp_path, cache, monkeypatch, how):
    a = make_ckpt(tmp_path / "a")
    expected = fingerprint(a)  # with a working cache
    shutil.rmtree(cache)
    if how == "parent-is-a-file":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        monkeypatch.setenv(content_hash.ENV_DIR, str(blocker / "cache"))
    elif how == "read-only-fs":
        monkeypatch.setattr(content_hash.tempfile, "mkstemp", _fail)
    elif how == "no-home":
        monkeypatch.delenv(content_hash.ENV_DIR)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setattr(content_hash.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError)))
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0500 directory")
        cache.mkdir(mode=0o500)
    try:
        assert fingerprint(a) == expected
        assert fingerprint(a) == expected
    finally:
        if cache.exists():
            cache.chmod(0o700)
    assert not list(cache.glob("*.tmp")) if cache.exists() else True


def test_cache_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(content_hash.ENV_DIR, str(tmp_path / "override"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert content_hash.cache_dir() == tmp_path / "override"
    monkeypatch.setenv(content_hash.ENV_DIR, "")  # empty: not set
    assert content_hash.cache_dir() == tmp_path / "xdg" / "twotower"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: ignore a relative one
    assert content_hash.cache_dir() == tmp_path / "home" / ".cache" / "twotower"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert content_hash.cache_dir() == tmp_path / "home" / ".cache" / "twotower"


def test_a_file_that_changes_while_it_is_hashed_is_not_cached(tmp_path, cache, monkeypatch):
    a = make_ckpt(tmp_path / "a")
    w = a / "model.safetensors"
    real = content_hash.hash_stream

    def racing(f):
        digest = real(f)
        with open(w, "ab") as g:  # a writer appends meanwhile
            g.write(b"\0" * 4)
        return digest

    monkeypatch.setattr(content_hash, "hash_stream", racing)
    fingerprint(a)
    assert not (cache / content_hash.CACHE_FILE).exists()


def test_concurrent_writers_never_leave_a_torn_cache(tmp_path, cache):
    cache.mkdir()
    stop = threading.Event()
    torn = []

    def reader():
        while not stop.is_set():
            try:
                data = (cache / content_hash.CACHE_FILE).read_bytes()
            except FileNotFoundError:
                continue
            try:
                json.loads(data)
            except ValueError:
                torn.append(data[:80])

    def writer(w):
        for i in range(40):
            content_hash._store(cache, f"{w}:{i}:0:0:0", "a" * 64, tmp_path / f"f{w}-{i}")

    r = threading.Thread(target=reader)
    r.start()
    ws = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in ws:
        t.start()
    for t in ws:
        t.join()
    stop.set()
    r.join()
    assert not torn
    entries = cache_entries(cache)
    assert 40 <= len(entries) <= 160  # a concurrent writer may drop another's entry, never corrupt
    assert not list(cache.glob("*.tmp"))


def test_the_cache_keeps_its_newest_entries(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(content_hash, "MAX_ENTRIES", 3)
    for i in range(5):
        content_hash._store(cache, f"k{i}", f"{i}" * 64, tmp_path / f"f{i}")
    assert list(cache_entries(cache)) == ["k2", "k3", "k4"]


# ---- weight files that are not plain readable files ----------------------------------------------------


def test_a_fifo_never_blocks(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="not a regular file"):
        content_hash.file_digest(fifo)
    assert time.monotonic() - t0 < 5
    a = make_ckpt(tmp_path / "a")
    (a / "model.safetensors").unlink()
    os.mkfifo(a / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        fingerprint(a)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_weight_file_is_one_line(tmp_path):
    a = make_ckpt(tmp_path / "a")
    (a / "model.safetensors").chmod(0)
    try:
        with pytest.raises(CheckpointError, match="Permission denied") as e:
            fingerprint(a)
    finally:
        (a / "model.safetensors").chmod(0o644)
    assert "\n" not in str(e.value)


def test_a_bad_header_is_still_refused(tmp_path):
    a = make_ckpt(tmp_path / "a")
    (a / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="bad header length"):
        fingerprint(a)


def test_on_hash_says_when_a_file_is_read_in_full(tmp_path):
    a = make_ckpt(tmp_path / "a")
    seen = []
    fp = fingerprint(a, on_hash=lambda f, n: seen.append((f.name, n)))
    assert seen == [("model.safetensors", (a / "model.safetensors").stat().st_size)]
    assert fingerprint(a, on_hash=lambda f, n: seen.append(f)) == fp and len(seen) == 1  # a hit: not called
