"""Writing a file so that a reader sees the old content or the new, whole: keys.yaml and
gateway.toml by the commands (the gateway's reloader reads them while they are edited),
and the ledger's sidecar by the usage writer."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, new_mode: int = 0o600, *,
                 durable: bool = True, tmp: Path | None = None) -> None:
    """Replace `path` with `data` (text is written as UTF-8).

    A temp file in the same folder (rename is atomic only within a file system), then the
    rename. The original file's mode and owner are kept (a new file gets `new_mode`), and a
    symlinked file is written through to its target, keeping the link. `durable`: fsync
    the data before the rename and the folder after it, for files people edit; a cache
    that is only ever re-derivable (the ledger's sidecar) skips it. `tmp`: the temp file's
    name, for a writer that cleans up the temp files a crash left behind by their names.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.stat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = new_mode, None
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    else:
        name = str(tmp)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    raw = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                with contextlib.suppress(OSError):  # only root may give a file away
                    os.fchown(f.fileno(), *owner)
            if durable:
                os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    if durable:
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
