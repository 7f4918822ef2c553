"""Write files so that a reader (or a crash) never sees half of one.

Each writer fills a temporary file beside the target, flushes it to disk,
then renames it over the target: os.replace is atomic on POSIX and Windows.
"""
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_folder_writable(folder, option: str) -> None:
    """Prove that ``folder`` (or, while it does not exist, its deepest existing parent) accepts new files,
    before any work starts: a run that fails only at its end wastes the user's time."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {folder} is not writable ({existing} is not a folder)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{option} {folder} is not writable ({e.strerror or e})") from e


def check_output_file(path, option: str) -> Path:
    """A file about to be written: its folder must already exist and accept files, and it must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    parent = path.absolute().parent
    if not parent.exists():
        raise UserError(f"{option} {path}: the folder {path.parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {path.parent} is not a folder")
    check_folder_writable(parent, option)
    return path


def remove_stale_temporaries(folder, name: str = "*") -> None:
    """Delete the temporary files that atomic_path leaves for ``name`` (every file by default) when a process is
    killed outright (SIGKILL, a power cut). Call it only where no other process may be writing into ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, rows) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
