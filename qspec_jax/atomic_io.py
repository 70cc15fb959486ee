"""Writing a file so that it holds either its old content or the complete new content.

Every file the project writes for a user (evaluation results, benchmark JSON, exported programs,
GPU reports, markdown tables) goes through `write_atomic`: a temporary file in the same
directory, flushed and fsync'ed, renamed over the path (``os.replace``, atomic on POSIX), then
the directory fsync'ed. On any failure, an interrupt included, the temporary file is removed and
the path is untouched: no partly written results file.
"""

from __future__ import annotations

import os
import tempfile


def write_atomic(
    path: str | os.PathLike,
    data: bytes | str,
    *,
    make_dirs: bool = False,
    dir_mode: int = 0o777,
) -> None:
    """Writes `data` (bytes, or text as UTF-8) at `path` atomically.

    Args:
        path: the file to write or replace.
        data: its whole new content.
        make_dirs: create the parent directories first (with `dir_mode`); otherwise a missing
            directory raises FileNotFoundError and nothing is written.
        dir_mode: permissions of directories `make_dirs` creates (e.g. 0o700 for a cache only
            this user may write).
    """
    path = os.path.abspath(os.fspath(path))
    d = os.path.dirname(path)
    if make_dirs:
        os.makedirs(d, mode=dir_mode, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
