"""Finding and hurting real processes in fault tests: Ray actors by their process titles, and where the driver (this
process's main thread) is, by its live call stack. Nothing here fakes an error; the tests send real signals."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def descendants(root: int) -> list[int]:
    kids, out, todo = children_map(), [], [root]
    while todo:
        pid = todo.pop()
        for k in kids.get(pid, []):
            out.append(k)
            todo.append(k)
    return out


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def actor_pids(cls: str, root: int | None = None) -> dict[int, str]:
    """{pid: process title} of the Ray actors of class `cls` started under `root` (default: this process). Ray titles
    an actor `ray::Class` when idle and `ray::Class.method` while it runs one."""
    return {pid: t for pid in descendants(root or os.getpid())
            if (t := title(pid)).split(" ")[0] in (f"ray::{cls}",) or t.startswith(f"ray::{cls}.")}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def driver_in(function: str, module_suffix: str) -> bool:
    """Is the main thread (the driver) inside `function` of a module whose file ends with `module_suffix`?"""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_code.co_filename.endswith(module_suffix):
            return True
        frame = frame.f_back
    return False


def wait_for(condition, timeout_s: float, poll_s: float = 0.005, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not seen within {timeout_s:.0f}s")
