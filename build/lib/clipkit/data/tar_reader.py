"""Reading webdataset tars defensively: retries, truncation, unsafe member names, incomplete samples.

A tar member `dir/key.ext` belongs to sample `dir/key` (webdataset's convention); a
sample is the run of consecutive members sharing a key. Every problem is a counted skip
(`SKIP_REASONS`), never an exception, so one bad shard cannot kill or stall a run:

    unopenable shard    could not be opened (retried `open_retries` times first)
    truncated tar       the archive breaks off: its remaining samples are lost
    unsafe member path  a member named `../x` or `/abs`, or a link: the sample is dropped
    missing image       no member with an image extension
    missing caption     no caption member
    caption not utf-8 / empty caption
    undecodable image   counted later, by the decoder (`clipkit.data.decode`)

Local uncompressed tars are read with seeks: only headers and captions are read here and
image bytes are fetched when the image is decoded (`ImageRef`). Skipping ahead on resume
then costs a few header reads per sample, and the shuffle buffer holds references, not
images. Pipes, remote URLs and compressed tars are streamed and their images kept in memory.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from time import sleep

from webdataset.gopen import gopen

from clipkit.data.urls import is_local

log = logging.getLogger(__name__)

SKIP_REASONS = ("unopenable shard", "truncated tar", "unsafe member path", "missing image", "missing caption",
                "caption not utf-8", "empty caption", "undecodable image")
# webdataset's split of a member name into sample key and extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass(frozen=True)
class ImageRef:
    """Where a local tar holds a member's bytes; read only when the image is decoded."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        data = os.pread(_fd(self.path), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.path} changed under the reader")
        return data


_FDS: OrderedDict[str, int] = OrderedDict()
_MAX_FDS = 16


def _fd(path: str) -> int:
    """A read-only descriptor for `path` from a small per-process LRU.

    Reads use pread, which leaves the file offset alone, so a descriptor inherited by a
    forked dataloader worker is as safe to use (or close) there as in the parent.
    """
    fd = _FDS.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(_FDS) >= _MAX_FDS:
            os.close(_FDS.popitem(last=False)[1])
    _FDS[path] = fd
    return fd


@dataclass(frozen=True)
class RawSample:
    """A sample that passed every check that needs no image decode."""

    key: str
    url: str
    source: int
    image: bytes | ImageRef
    caption: str

    def image_bytes(self) -> bytes:
        return self.image.read() if isinstance(self.image, ImageRef) else self.image


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts


class ShardReader:
    """Turns one shard URL into `RawSample`s, counting every skip into `skipped`.

    `skipped` is shared with the caller, which attributes the counts to the batch being built
    and may clear it; each reason is logged once per reader (a dataloader worker owns one).
    """

    def __init__(self, skipped: Counter, *, image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 text_ext: str = "txt", open_retries: int = 3, retry_delay_s: float = 2.0):
        self.skipped = skipped
        self.image_exts = tuple(image_exts)
        self.text_ext = text_ext
        self.open_retries = open_retries
        self.retry_delay_s = retry_delay_s
        self.warned: set[str] = set()

    def skip(self, reason: str, what: str) -> None:
        """Counts one skip; the first of each reason is logged with the sample it hit."""
        if reason not in self.warned:
            self.warned.add(reason)
            log.warning("skipping %s: %s (further ones are only counted)", what, reason)
        self.skipped[reason] += 1

    def _open(self, url: str) -> tuple[tarfile.TarFile, object, str, int | None] | None:
        """(tar, underlying file, local path, file size if seekable) or None after the retries are spent."""
        path = url[len("file://"):] if url.startswith("file://") else url
        seekable = is_local(path) and path.endswith(".tar")
        error: Exception | None = None
        for attempt in range(1 + self.open_retries):
            if attempt:
                sleep(self.retry_delay_s * attempt)
            stream = None
            try:
                stream = open(path, "rb") if is_local(path) else gopen(url, "rb")
            except OSError as exn:   # missing file, permissions, a pipe that cannot start: may be transient
                error = exn
                continue
            try:
                if seekable:
                    return tarfile.open(fileobj=stream, mode="r:"), stream, path, os.fstat(stream.fileno()).st_size
                return tarfile.open(fileobj=stream, mode="r|*"), stream, path, None
            except (tarfile.TarError, OSError, EOFError) as exn:
                error = exn
                _close(stream)
                if is_local(path):
                    break   # the bytes of a local file will not change on a retry
        log.warning("skipping shard %s: cannot open it (%s: %s)", url, type(error).__name__, error)
        self.skipped["unopenable shard"] += 1
        return None

    def samples(self, url: str, source: int) -> Iterator[RawSample]:
        """The shard's usable samples in tar order."""
        opened = self._open(url)
        if opened is None:
            return
        tar, stream, path, size = opened
        group: dict[str, object] = {}
        try:
            for member in tar:
                match = _KEY_EXT.match(member.name)
                if member.isdir() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if group and group["key"] != key:
                    sample = self._finish(group, url, source)
                    group = {}
                    if sample is not None:
                        yield sample
                if not group:
                    group = {"key": key}
                if not member.isfile() or _unsafe(member.name):
                    group["unsafe"] = True
                    continue
                if size is not None and member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                if ext == self.text_ext:
                    group[ext] = tar.extractfile(member).read()
                elif ext in self.image_exts:
                    group[ext] = (ImageRef(path, member.offset_data, member.size) if size is not None
                                  else tar.extractfile(member).read())
            sample = self._finish(group, url, source) if group else None
            if sample is not None:
                yield sample
            if size is not None and size % tarfile.BLOCKSIZE:
                # tarfile ends quietly at a header cut in half; tars are whole 512-byte blocks.
                raise tarfile.ReadError(f"{size} bytes is not a whole number of tar blocks")
        except (tarfile.TarError, OSError, EOFError) as exn:
            # The partial sample being assembled is dropped with the rest of the shard.
            log.warning("skipping the rest of shard %s: truncated or corrupt (%s)", url, exn)
            self.skipped["truncated tar"] += 1
        finally:
            tar.close()
            _close(stream)

    def _finish(self, group: dict[str, object], url: str, source: int) -> RawSample | None:
        what = f"sample {group['key']} in {url}"
        if group.get("unsafe"):
            return self.skip("unsafe member path", what)
        image_ext = next((ext for ext in self.image_exts if ext in group), None)
        if image_ext is None:
            return self.skip("missing image", what)
        if self.text_ext not in group:
            return self.skip("missing caption", what)
        try:
            caption = group[self.text_ext].decode("utf-8").strip()
        except UnicodeDecodeError:
            return self.skip("caption not utf-8", what)
        if not caption:
            return self.skip("empty caption", what)
        return RawSample(str(group["key"]), url, source, group[image_ext], caption)


def _close(stream) -> None:
    """Closes a file or webdataset pipe; a pipe's non-zero exit was already seen as a short read."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - webdataset's Pipe raises a bare IOError on a failed command
        pass
