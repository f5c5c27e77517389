"""Files written whole or not at all: a temporary file beside the target, fsync, then rename over it.

A process killed while writing (SIGKILL, power loss) leaves its temporary file behind; the next write to
the same target removes the temporaries of writers that are no longer running.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^.]*)?$")


def temporary_path(path: Path) -> Path:
    """Where this process writes `path` before renaming it (hidden, named after the target and the pid;
    the target's suffix is kept, since some writers pick the format by it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Removes the temporary files that writers of `path` left when they were killed; returns them."""
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = TEMPORARY.fullmatch(sibling.name)
        if match is None or match["name"] != path.name or int(match["pid"]) == os.getpid() \
                or _running(int(match["pid"])):
            continue
        try:
            sibling.unlink()
            removed.append(sibling)
        except OSError:
            pass
    return removed


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` writes the whole file; it then replaces `path` in one rename, after an fsync."""
    path = Path(path)
    remove_stale_temporaries(path)
    temporary = temporary_path(path)
    try:
        write(temporary)
        with temporary.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
