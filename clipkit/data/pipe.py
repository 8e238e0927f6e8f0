"""`pipe:` shard sources: a shell command's stdout, read with a stall timeout.

webdataset's own pipe (`gopen("pipe:...")`) blocks forever on a command that stops writing
(a hung `aws s3 cp`), drops the command's stderr, and on close waits up to two hours for the
command to end. `PipeReader` waits for the command's stdout with `poll`, so a command that
writes nothing for `data.read_timeout_s` seconds is killed (its whole process group: `sh -c`
and what it started) and reported as stalled; a command that ends with a non-zero status is
reported with that status and the tail of its stderr. Both raise `SourceError`, which the
tar reader turns into a retry and, once the retries are spent, a counted skip.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile

# How much of a failed command's stderr a warning quotes.
STDERR_TAIL_BYTES = 400
# A tar block: the least a read returns unless the output ends.
MIN_READ = 512


class SourceError(OSError):
    """A `pipe:` command failed or stalled; `reason` is its skip reason (`failed source`, `stalled source`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class PipeReader:
    """The stdout of `command` (run by the shell in its own process group) as a readable binary file.

    `read` raises `SourceError("stalled source")` after `read_timeout_s` seconds without a byte,
    and `SourceError("failed source")` at the end of the output when the command exited non-zero.
    `close` kills the command if it still runs (a reader that stops early does not wait for it).
    """

    def __init__(self, command: str, *, read_timeout_s: float):
        self.command = command
        self.read_timeout_s = read_timeout_s
        self.closed = False
        # A file, not a pipe, for stderr: nobody has to drain it while stdout is read.
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=self._stderr, start_new_session=True)
        except BaseException:
            self._stderr.close()
            raise
        self._fd = self._proc.stdout.fileno()
        # poll, not select: select cannot watch a descriptor numbered 1024 or above.
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (-1: all): what the command has written so far, but at least
        min(size, 512) bytes unless its output ends. tarfile takes short reads, so the samples
        written before a failure are read; its compression sniffing gets a whole 512-byte block."""
        chunks, got = [], 0
        while size < 0 or got < min(size, MIN_READ):
            chunk = self._read_chunk(size - got if size >= 0 else 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read_chunk(self, most: int) -> bytes:
        """1..`most` bytes, or b"" at the end of a successful command's output."""
        if not self._poll.poll(self.read_timeout_s * 1000):
            self._kill()
            raise SourceError("stalled source", f"`{self.command}` wrote nothing for {self.read_timeout_s:g} s "
                                                f"(data.read_timeout_s) and was killed{self._stderr_tail()}")
        data = os.read(self._fd, most)
        if not data:
            self._wait_for_exit()
        return data

    def _wait_for_exit(self) -> None:
        """At the end of the output: raises unless the command exits with status 0."""
        try:
            status = self._proc.wait(timeout=self.read_timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
            raise SourceError("stalled source", f"`{self.command}` closed its output but did not exit within "
                                                f"{self.read_timeout_s:g} s (data.read_timeout_s) and was killed"
                                                f"{self._stderr_tail()}") from None
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise SourceError("failed source", f"`{self.command}` {how}{self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        """'; stderr: <last lines, joined>' or '' when the command wrote none."""
        size = self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, size - STDERR_TAIL_BYTES))
        tail = " | ".join(line.strip() for line in self._stderr.read().decode("utf-8", "replace").splitlines()
                          if line.strip())
        return f"; stderr: {tail}" if tail else ""

    def _kill(self) -> None:
        """SIGKILLs the command's process group while its leader is not yet reaped (so the group id
        cannot have been reused), then reaps it."""
        if self._proc.returncode is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._kill()
            self._proc.stdout.close()
            self._stderr.close()


def open_pipe(url: str, *, read_timeout_s: float) -> PipeReader:
    """`pipe:<command>` -> the command's stdout."""
    return PipeReader(url[len("pipe:"):], read_timeout_s=read_timeout_s)
