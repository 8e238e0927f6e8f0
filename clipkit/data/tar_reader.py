"""Reading webdataset tars defensively: retries, truncation, unsafe member names, incomplete samples.

A tar member `dir/key.ext` belongs to sample `dir/key` (webdataset's convention); a
sample is the run of consecutive members sharing a key. Every problem is a counted skip
(`SKIP_REASONS`), never an exception, so one bad shard cannot kill or stall a run:

    unopenable shard    could not be opened (retried `open_retries` times first)
    failed source       a `pipe:` command exited non-zero (or a remote stream broke) and kept
                        doing so over `open_retries` retries: the shard's remaining samples are lost
    stalled source      a `pipe:` command wrote nothing for `read_timeout_s` seconds, likewise
    truncated tar       the archive breaks off, also exactly at a member boundary (no
                        end-of-archive block): its remaining samples are lost
    unsafe member path  a member named `../x` or `/abs`, or a link: the sample is dropped
    missing image       no member with an image extension
    missing caption     no caption member
    caption not utf-8 / empty caption
    undecodable image   counted later, by the decoder (`clipkit.data.decode`)

With text roles (`data.texts`, `clipkit.data.texts`) the caption checks give way to each
role's: the reader keeps every member a role reads (and the `.json` when one reads a field)
and a sample without a usable text of a required role is skipped as `missing text <role>`,
`empty text <role>`, `text <role> not utf-8`, `text <role> not a string`, `json not utf-8`
or `json invalid` (`clipkit.data.texts.role_skip_reasons`).

A retried shard is read again from its start and passes over the samples already handled,
so it yields exactly what one clean read would have (exact resume depends on it).

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

from clipkit.data.pipe import SourceError, open_pipe
from clipkit.data.texts import RoleTexts, TextRole, kept_members, read_roles
from clipkit.data.urls import is_local

log = logging.getLogger(__name__)

SKIP_REASONS = ("unopenable shard", "failed source", "stalled source", "truncated tar", "unsafe member path",
                "missing image", "missing caption", "caption not utf-8", "empty caption", "undecodable image")
# The reasons that say a shard's source, not its content, is broken (`ShardReader.failure`).
SOURCE_FAILURES = ("unopenable shard", "failed source", "stalled source")
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
    """A sample that passed every check that needs no image decode.

    Without text roles `caption` is its `txt` and `texts` None; with roles `caption` is None
    and `texts` holds each role's texts per source (`clipkit.data.texts.read_roles`)."""

    key: str
    url: str
    source: int
    image: bytes | ImageRef
    caption: str | None
    texts: dict[str, RoleTexts] | None = None

    def image_bytes(self) -> bytes:
        return self.image.read() if isinstance(self.image, ImageRef) else self.image


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records on its TarFile the header error that ended the archive (`clipkit_end`).

    tarfile ends its member list quietly at an end-of-archive zero block (`EOFHeaderError`),
    but also at the end of the file (`EmptyHeaderError`: a tar cut exactly at a member
    boundary) and at a header cut short or invalid; only the first is a complete archive.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exn:
            tar.clipkit_end = exn
            raise


class _ShardFailure(Exception):
    """One failed attempt at a shard: the skip reason, whether another attempt may help, and
    whether it happened while opening the shard (before its first member)."""

    def __init__(self, reason: str, error: BaseException, *, retry: bool, opening: bool):
        super().__init__(f"{reason}: {error}")
        self.reason, self.error, self.retry, self.opening = reason, error, retry, opening


class ShardReader:
    """Turns one shard URL into `RawSample`s, counting every skip into `skipped`.

    `skipped` is shared with the caller, which attributes the counts to the batch being built
    and may clear it; each sample-level reason is logged once per reader (a dataloader worker
    owns one), each shard-level one (a shard cut short or lost) every time.
    After `samples(url, ...)` is exhausted, `failure` is the reason the shard ended early,
    or None when it was read to its end.
    """

    def __init__(self, skipped: Counter, *, image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 text_ext: str = "txt", open_retries: int = 3, retry_delay_s: float = 2.0,
                 read_timeout_s: float = 60.0, roles: Sequence[TextRole] | None = None):
        """`roles`: the text roles (`data.texts`); None reads one caption from `text_ext`."""
        self.skipped = skipped
        self.image_exts = tuple(image_exts)
        self.text_ext = text_ext
        self.roles = tuple(roles) if roles else None
        # The text members a sample group keeps; at a cut, a last group is yielded only with all of them.
        self.text_members = kept_members(self.roles) if self.roles else frozenset((text_ext,))
        self.open_retries = open_retries
        self.retry_delay_s = retry_delay_s
        self.read_timeout_s = read_timeout_s
        self.warned: set[str] = set()
        self.failure: str | None = None

    def skip(self, reason: str, what: str) -> None:
        """Counts one skip; the first of each reason is logged with the sample it hit."""
        if reason not in self.warned:
            self.warned.add(reason)
            log.warning("skipping %s: %s (further ones are only counted)", what, reason)
        self.skipped[reason] += 1

    def samples(self, url: str, source: int) -> Iterator[RawSample]:
        """The shard's usable samples in tar order.

        A shard that cannot be opened, or whose source fails while it is read, is tried again
        up to `open_retries` times with growing delays; each new attempt passes over the sample
        groups already handled. Then the shard is skipped with a warning and one count of its
        reason. A local file's bytes do not change on a retry, so a corrupt one is not retried.
        """
        self.failure = None
        done = 0   # sample groups handed out or counted as skipped, over all attempts
        for attempt in range(1 + self.open_retries):
            if attempt:
                sleep(self.retry_delay_s * attempt)
            try:
                for index, group in enumerate(self._groups(url)):
                    if index < done:
                        continue
                    done += 1
                    sample = self._finish(group, url, source)
                    if sample is not None:
                        yield sample
                return
            except _ShardFailure as exn:
                failure = exn
            if not failure.retry:
                break
        tries = f" ({attempt + 1} tries)" if attempt else ""
        error = f"{type(failure.error).__name__}: {failure.error}"
        if failure.opening:
            log.warning("skipping shard %s: cannot open it (%s)%s", url, error, tries)
        else:
            log.warning("skipping the rest of shard %s after %d samples: %s (%s)%s", url, done, failure.reason,
                        error, tries)
        self.failure = failure.reason
        self.skipped[failure.reason] += 1

    def _open(self, url: str, path: str):
        """The shard's byte stream: a local file, a `pipe:` command's stdout or a webdataset URL."""
        if url.startswith("pipe:"):
            return open_pipe(url, read_timeout_s=self.read_timeout_s)
        return open(path, "rb") if is_local(path) else gopen(url, "rb")

    def _groups(self, url: str) -> Iterator[dict[str, object]]:
        """One attempt at the shard: its sample groups `{"key", <ext>: bytes | ImageRef, "unsafe"?}`
        in tar order. Raises `_ShardFailure`; the partial group being assembled at a failure is
        not yielded."""
        path = url[len("file://"):] if url.startswith("file://") else url
        local = is_local(path)
        seekable = local and path.endswith(".tar")
        stream = tar = None
        opening = True
        try:
            stream = self._open(url, path)
            size = os.fstat(stream.fileno()).st_size if seekable else None
            tar = tarfile.open(fileobj=stream, mode="r:" if seekable else "r|*", tarinfo=_EndAwareTarInfo)
            opening = False
            group: dict[str, object] = {}
            for member in tar:
                match = _KEY_EXT.match(member.name)
                if member.isdir() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if group and group["key"] != key:
                    yield group
                    group = {}
                if not group:
                    group = {"key": key}
                if not member.isfile() or _unsafe(member.name):
                    group["unsafe"] = True
                    continue
                if size is not None and member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                if ext in self.text_members:
                    group[ext] = tar.extractfile(member).read()
                elif ext in self.image_exts:
                    group[ext] = (ImageRef(path, member.offset_data, member.size) if size is not None
                                  else tar.extractfile(member).read())
            end = getattr(tar, "clipkit_end", None)
            complete = isinstance(end, tarfile.EOFHeaderError)
            if group and (complete or (self.text_members <= group.keys()
                                       and any(ext in group for ext in self.image_exts))):
                yield group   # at a cut, a last group without its image or a text member is lost with the rest
            if not complete:
                raise tarfile.ReadError(f"the archive stops without its end-of-archive block ({end})")
        except SourceError as exn:
            raise _ShardFailure(exn.reason, exn, retry=True, opening=opening) from None
        except (tarfile.TarError, OSError, EOFError) as exn:
            if opening:
                # A missing file may appear and a remote one come back; a local file's bytes stay bad.
                retry = not (local and stream is not None)
                raise _ShardFailure("unopenable shard", exn, retry=retry, opening=True) from None
            # A local file's error is in its bytes; a remote stream's may be the network's.
            reason = "truncated tar" if local or not isinstance(exn, OSError) else "failed source"
            raise _ShardFailure(reason, exn, retry=reason != "truncated tar", opening=False) from None
        finally:
            if tar is not None:
                tar.close()
            if stream is not None:
                _close(stream)

    def _finish(self, group: dict[str, object], url: str, source: int) -> RawSample | None:
        what = f"sample {group['key']} in {url}"
        if group.get("unsafe"):
            return self.skip("unsafe member path", what)
        image_ext = next((ext for ext in self.image_exts if ext in group), None)
        if image_ext is None:
            return self.skip("missing image", what)
        if self.roles is not None:
            texts, reason = read_roles(self.roles, {ext: group[ext] for ext in self.text_members if ext in group})
            if texts is None:
                return self.skip(reason, what)
            return RawSample(str(group["key"]), url, source, group[image_ext], None, texts)
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
    """Closes a file or stream; a `pipe:` command's exit was already checked at the end of its output."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - webdataset's Pipe raises a bare IOError on a failed command
        pass
