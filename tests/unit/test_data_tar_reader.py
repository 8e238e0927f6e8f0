"""Bad data on real tars and dead `pipe:` sources (real subprocesses): every kind is skipped and counted."""

import io
import logging
import os
import tarfile
import time
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from clipkit.data.tar_reader import ImageRef, ShardReader


def _png(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, members, link_name=None):
    """A real tar of `(name, bytes)` members, names written verbatim (tarfile accepts `../x`)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link_name:
            link = tarfile.TarInfo(link_name)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return str(path)


def good(key, i=0):
    return [(f"{key}.png", _png(i)), (f"{key}.txt", f"caption {key}".encode())]


def read(url, **kw):
    skipped = Counter()
    reader = ShardReader(skipped, **({"retry_delay_s": 0.0} | kw))
    return [s.key for s in reader.samples(url, source=0)], skipped


def test_each_bad_sample_kind_is_skipped_and_counted(tmp_path, caplog):
    url = write_tar(tmp_path / "bad.tar", [
        *good("a"),
        ("nocap.png", _png()),
        ("noimg.txt", b"only words"),
        ("blank.png", _png()), ("blank.txt", b"  \n"),
        ("latin.png", _png()), ("latin.txt", "caf\xe9".encode("latin-1")),
        ("../escape.png", _png()), ("../escape.txt", b"out of the directory"),
        ("/abs/path.png", _png()), ("/abs/path.txt", b"absolute"),
        ("sub/b.png", _png()), ("sub/b.txt", b"nested is fine"), ("sub/b.json", b"{}"),
        *good("c"),
    ], link_name="link.png")
    with caplog.at_level(logging.WARNING, logger="clipkit.data.tar_reader"):
        keys, skipped = read(url)
    assert keys == ["a", "sub/b", "c"]
    assert skipped == {"missing image": 1, "missing caption": 1, "empty caption": 1, "caption not utf-8": 1,
                       "unsafe member path": 3}
    assert any("../escape" in r.getMessage() and "unsafe member path" in r.getMessage() for r in caplog.records)


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    full = write_tar(tmp_path / "full.tar", [m for k in "abcd" for m in good(k)])
    data = open(full, "rb").read()
    with tarfile.open(full) as tar:
        cut = tar.getmember("c.png").offset_data + 10   # inside sample c's image
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    local = read(str(tmp_path / "cut.tar"))
    piped = read(f"pipe:cat {tmp_path / 'cut.tar'}")
    assert local == piped == (["a", "b"], Counter({"truncated tar": 1}))
    # A cut inside a header: tarfile would end quietly; the block count gives it away.
    header_cut = tarfile.open(full).getmember("d.png").offset + 100
    (tmp_path / "cut_header.tar").write_bytes(data[:header_cut])
    keys, skipped = read(str(tmp_path / "cut_header.tar"))
    assert keys == ["a", "b", "c"] and skipped == {"truncated tar": 1}


def test_unopenable_shards_are_retried_then_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    sleeps = []
    monkeypatch.setattr("clipkit.data.tar_reader.sleep", sleeps.append)
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive" * 50)
    with caplog.at_level(logging.WARNING, logger="clipkit.data.tar_reader"):
        for url, reason in ((str(tmp_path / "gone.tar"), "unopenable shard"), ("pipe:exit 3", "failed source"),
                            (str(tmp_path / "garbage.tar"), "unopenable shard")):
            keys, skipped = read(url, open_retries=2, retry_delay_s=0.5)
            assert keys == [] and skipped == {reason: 1}
            assert any(url in r.getMessage() and "cannot open" in r.getMessage() for r in caplog.records)
    assert any("`exit 3` exited with status 3" in r.getMessage() for r in caplog.records)
    # Missing file and failing pipe: 2 retries each, backing off; a corrupt local file is not retried.
    assert sleeps == [0.5, 1.0, 0.5, 1.0]


def test_a_shard_that_comes_back_on_retry_is_read(tmp_path, monkeypatch):
    url = write_tar(tmp_path / "late.tar", good("a"))
    (tmp_path / "late.tar").rename(tmp_path / "hidden.tar")

    def appear(_):
        (tmp_path / "hidden.tar").rename(tmp_path / "late.tar")

    monkeypatch.setattr("clipkit.data.tar_reader.sleep", appear)
    assert read(url, open_retries=1) == (["a"], Counter())


def test_local_tars_defer_image_bytes_pipes_carry_them(tmp_path):
    url = write_tar(tmp_path / "x.tar", good("a", 7) + good("b", 9))
    reader = ShardReader(Counter())
    local = list(reader.samples(url, 0))
    piped = list(reader.samples(f"pipe:cat {url}", 1))
    assert all(isinstance(s.image, ImageRef) for s in local) and all(isinstance(s.image, bytes) for s in piped)
    assert [s.image_bytes() for s in local] == [s.image for s in piped] == [_png(7), _png(9)]
    assert [s.source for s in piped] == [1, 1] and local[0].caption == "caption a"


@pytest.mark.parametrize("scheme", ["file://", ""])
def test_file_urls_read_like_paths(tmp_path, scheme):
    url = write_tar(tmp_path / "x.tar", good("a"))
    assert read(scheme + url) == (["a"], Counter())


def _shard(tmp_path, members=()):
    """A real tar of samples k0..k5 (each member 1 KiB with its header), after `members`."""
    return write_tar(tmp_path / "shard.tar", [*members, *(m for i in range(6) for m in good(f"k{i}", i))])


def test_a_pipe_that_fails_mid_shard_is_retried_then_skipped_with_its_exit_and_stderr(tmp_path, caplog, monkeypatch):
    sleeps = []
    monkeypatch.setattr("clipkit.data.tar_reader.sleep", sleeps.append)
    url = f"pipe:sh -c 'head -c 5000 {_shard(tmp_path)}; echo connection reset by peer >&2; exit 3'"
    with caplog.at_level(logging.WARNING, logger="clipkit.data.tar_reader"):
        keys, skipped = read(url, open_retries=2, retry_delay_s=0.5)
    # 5,000 bytes hold k0 and k1 whole and k2 in part; the retries hand out nothing twice.
    assert keys == ["k0", "k1"] and skipped == {"failed source": 1}
    assert sleeps == [0.5, 1.0]
    [warning] = [r.getMessage() for r in caplog.records]
    assert url in warning and "after 2 samples" in warning and "(3 tries)" in warning
    assert "exited with status 3; stderr: connection reset by peer" in warning


def test_a_pipe_that_fails_once_is_read_whole_on_the_retry_without_repeats(tmp_path):
    shard = _shard(tmp_path, [("nocap.png", _png())])
    flag = tmp_path / "failed_once"
    url = (f"pipe:sh -c 'if [ -e {flag} ]; then cat {shard}; "
           f"else touch {flag}; head -c 5000 {shard}; exit 3; fi'")
    keys, skipped = read(url, open_retries=1)
    # The first attempt got past `nocap` and k0; the retry passes over both, so neither the
    # sample nor the skip is counted twice.
    assert keys == [f"k{i}" for i in range(6)] and skipped == {"missing caption": 1}


def test_a_stalled_pipe_is_killed_retried_then_skipped(tmp_path, caplog):
    pids = tmp_path / "pids"
    url = f"pipe:sh -c 'echo $$ >> {pids}; head -c 5000 {_shard(tmp_path)}; sleep 30'"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="clipkit.data.tar_reader"):
        keys, skipped = read(url, open_retries=1, read_timeout_s=1.0)
    assert time.monotonic() - start < 10   # two tries of 1 s, not 2 x 30 s
    assert keys == ["k0", "k1"] and skipped == {"stalled source": 1}
    [warning] = [r.getMessage() for r in caplog.records]
    assert url in warning and "wrote nothing for 1 s (data.read_timeout_s) and was killed" in warning
    for pgid in map(int, pids.read_text().split()):   # sh and its sleep are gone, both tries
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)


def test_a_tar_cut_at_a_member_boundary_is_counted_as_truncated(tmp_path):
    full = write_tar(tmp_path / "full.tar", [m for k in "abcd" for m in good(k)])
    data = open(full, "rb").read()
    with tarfile.open(full) as tar:
        between_samples, inside_sample = tar.getmember("c.png").offset, tar.getmember("c.txt").offset
        last = tar.getmember("d.txt")
    # Cut before c, or between c's image and its caption: c is lost either way, counted once.
    for cut in (between_samples, inside_sample):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        local = read(str(tmp_path / "cut.tar"))
        piped = read(f"pipe:cat {tmp_path / 'cut.tar'}")
        assert local == piped == (["a", "b"], Counter({"truncated tar": 1}))
    # One end-of-archive zero block is a complete archive: nothing is lost.
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    (tmp_path / "ended.tar").write_bytes(data[:end + tarfile.BLOCKSIZE])
    assert read(str(tmp_path / "ended.tar")) == read(f"pipe:cat {tmp_path / 'ended.tar'}") == (list("abcd"), Counter())
    (tmp_path / "no_end.tar").write_bytes(data[:end])
    assert read(str(tmp_path / "no_end.tar")) == (list("abcd"), Counter({"truncated tar": 1}))
