"""The built-in environment `python`: the model writes a fenced Python block, it runs in a sandbox process, and the
observation is its output. A turn without a code block ends the trajectory (the model has answered).

The sandbox (`run_python`) is a fresh `python -I` process per block with
- a wall-clock limit (`timeout_s`) and a CPU-time limit (`cpu_s`, RLIMIT_CPU); its whole process group is killed
  at the end, whatever it left behind;
- a memory limit (`memory_mb`, RLIMIT_AS: an allocation past it raises MemoryError) and a file-size limit
  (`file_mb`, RLIMIT_FSIZE: also bounds what it prints, which goes to a file);
- no inherited environment variables (PATH, HOME and the thread settings only), a fresh temporary working directory
  that is deleted afterwards, no core dumps;
- an audit hook (PEP 578) installed before the code runs, which refuses: creating processes (fork, exec,
  subprocess, os.system), signals to any other process, writing, deleting or renaming files outside its directory,
  reading other processes' /proc entries (the parent's environment), sockets, and ctypes. Refusals are
  PermissionError in the code's own traceback;
- its output cut to `max_output_chars` (head and tail kept).

What it is not: a security boundary. The hook lives in the same interpreter as the code, and a determined
attacker (a C extension already installed, an interpreter bug) can get past it; there is no network or
filesystem namespace. It bounds what a model writes by accident or by reward hacking on a machine you own. On a
shared cluster, run the code in a container or VM sandbox (gVisor, Firecracker, nsjail, or a service such as
SandboxFusion) behind your own environment class (`env.name: my_env.py:MyTool`).
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from rollout.env import Reply

CODE_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:\n```|$)", re.S)

# Runs first in the sandbox process: installs the hook, then runs the model's code (main.py) as __main__.
PRELUDE = r'''
import os, sys
ROOT = os.path.realpath(os.getcwd())
PID = os.getpid()
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
SPAWN = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.popen",
         "subprocess.Popen", "pty.spawn", "os.startfile"}
# ctypes may be imported (numpy does), not used to reach C functions or raw memory.
CTYPES = {"ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer",
          "ctypes.string_at", "ctypes.wstring_at", "ctypes.set_errno", "ctypes.PyObj_FromPtr"}
FILES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
         "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chdir"}

def inside(path):
    try:
        path = os.fsdecode(path) if not isinstance(path, int) else None
    except Exception:
        return False
    if path is None:  # an already open descriptor
        return True
    full = os.path.realpath(os.path.join(ROOT, path))
    return full == ROOT or full.startswith(ROOT + os.sep)

def other_proc(path):
    try:
        full = os.path.realpath(os.path.join(ROOT, os.fsdecode(path)))
    except Exception:
        return False
    parts = full.split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2] not in ("self", "thread-self", str(PID))

def hook(event, args):
    if event in SPAWN:
        raise PermissionError(f"sandbox: {event} is not allowed (no new processes)")
    if event in ("os.kill", "os.killpg", "signal.pthread_kill") and args and args[0] not in (0, PID):
        raise PermissionError(f"sandbox: {event} is not allowed (signals to other processes)")
    if event.startswith("socket.") or event in CTYPES:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args:
        path, mode, flags = (list(args) + [None, None])[:3]
        if isinstance(path, int):
            return
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE)
        if writes and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} is not allowed (outside its directory)")
        if other_proc(path):
            raise PermissionError(f"sandbox: reading {path!r} is not allowed (another process)")
    if event in FILES and args:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                raise PermissionError(f"sandbox: {event} of {path!r} is not allowed (outside its directory)")

import traceback
with open("main.py") as f:
    source = f.read()
sys.argv = ["main.py"]
sys.addaudithook(hook)
try:
    exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as err:  # the model's traceback, without this prelude's frames
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename != __file__]
    print("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
          + "".join(traceback.format_exception_only(type(err), err)), end="", file=sys.stderr)
    sys.exit(1)
'''


@dataclass
class Run:
    output: str  # stdout, then stderr, cut to max_output_chars
    ok: bool  # exit code 0 within the limits
    timed_out: bool  # the wall-clock or the CPU-time limit ended it
    limit: str  # which limit ended it ("" when none did): timeout, cpu, memory, output
    seconds: float


def _limits(cpu_s: int, memory_mb: int, file_mb: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() != 0:  # root is not bound by it; the audit hook refuses new processes either way
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return apply


def cut(text: str, max_chars: int) -> str:
    """Head and tail of a long output, with how much was left out."""
    if len(text) <= max_chars:
        return text
    head, tail = max_chars // 2, max_chars - max_chars // 2
    return f"{text[:head]}\n... [{len(text) - max_chars} characters cut] ...\n{text[-tail:]}"


def run_python(code: str, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512, file_mb: int = 8,
               max_output_chars: int = 512) -> Run:
    """Run `code` in a fresh sandbox process (see the module's doc) and return what it printed."""
    start = time.monotonic()
    work = tempfile.mkdtemp(prefix="rlvr-python-")
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        with open(os.path.join(work, ".prelude.py"), "w") as f:
            f.write(PRELUDE)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        with open(os.path.join(work, ".out"), "wb") as out, open(os.path.join(work, ".err"), "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", ".prelude.py"], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, close_fds=True,
                                    preexec_fn=_limits(cpu_s, memory_mb, file_mb))
            timed_out = False
            try:
                code_ = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group: anything it started goes with it
                except ProcessLookupError:
                    pass
                code_ = proc.wait()
        text = _read(os.path.join(work, ".out"), file_mb) + _read(os.path.join(work, ".err"), file_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    limit = "timeout" if timed_out else {-signal.SIGXCPU: "cpu", -signal.SIGKILL: "cpu",
                                          -signal.SIGXFSZ: "output"}.get(code_, "")
    if not limit and "File too large" in text:  # Python ignores SIGXFSZ: the write past RLIMIT_FSIZE fails instead
        limit = "output"
    if not limit and "MemoryError" in text:
        limit = "memory"
    if limit == "timeout":
        text += f"\nTimeoutError: the code ran past {timeout_s:g}s and was stopped"
    elif limit == "cpu":
        text += f"\nTimeoutError: the code used more than {cpu_s}s of CPU time and was stopped"
    elif limit == "output":
        text += f"\nOSError: the code wrote more than {file_mb} MiB and was stopped"
    elif code_ != 0 and not text.strip():
        text = f"[exit code {code_}]"
    return Run(cut(text.strip(), max_output_chars), code_ == 0 and not timed_out, limit in ("timeout", "cpu"),
               limit, time.monotonic() - start)


def _read(path: str, file_mb: int) -> str:
    with open(path, "rb") as f:
        return f.read(file_mb << 20).decode("utf-8", "replace")


def last_code_block(text: str) -> str | None:
    blocks = CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


class PythonTool:
    """`env.name: python`. `env.args` sets the sandbox's limits (`run_python`'s keywords)."""

    def __init__(self, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512, file_mb: int = 8,
                 max_output_chars: int = 512):
        self.limits = dict(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, file_mb=file_mb,
                           max_output_chars=max_output_chars)

    def step(self, row: dict, turns: list[str]) -> Reply:
        code = last_code_block(turns[-1])
        if code is None:
            return Reply(done=True)
        run = run_python(code, **self.limits)
        return Reply(f"```output\n{run.output}\n```\n",
                     info={"tool_calls": 1.0, "tool_errors": float(not run.ok), "tool_timeouts": float(run.timed_out),
                           "tool_ok": float(run.ok), "tool_seconds": run.seconds})
