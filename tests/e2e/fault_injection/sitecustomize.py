"""Fault injection for the end-to-end tests: Python runs this at start-up in every process whose
PYTHONPATH puts this folder first (`tests/e2e/test_faults.py`, `with_faults`).

CLIPKIT_FAULT_ENOSPC=<text>: every `torch.save` to a path containing <text> (a checkpoint tag)
writes half of its bytes, then fails with ENOSPC, as a disk that fills during the save.
"""

import errno
import io
import os

_TARGET = os.environ.get("CLIPKIT_FAULT_ENOSPC")

if _TARGET:
    import torch

    _real_save = torch.save

    def _save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or _TARGET not in str(f):
            return _real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        _real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    torch.save = _save_until_the_disk_is_full
