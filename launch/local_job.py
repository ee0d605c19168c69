"""Run the job the way a cluster user does, on this machine: start a private Ray head, `ray job submit` to it,
stream the logs, stop that head, exit with the job's status.

    python -m launch.local_job [--config PRESET] [key.sub=value ...]

The head binds to 127.0.0.1 with its own free ports, its own temp dir and its own auth token, runs in its own
process session, and is stopped by that session's process group: nothing else on the machine is touched (no
`ray stop`, which would kill every Ray process of the user).

SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal closed), to this process or to the `make` that started it, stop
the job the way `ray job stop` does: it writes a checkpoint at the end of its step and exits (a second signal does
not wait for that). Then the head is stopped and its temp dir removed. Running it again continues the run.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from core.weight_sync import free_port

ROOT = Path(__file__).resolve().parent.parent
# How long `ray job stop` lets the job finish its step and write its checkpoint before Ray kills it (Ray's own
# default is 3 s). Read by Ray's job supervisor: on a cluster, set it in the environment of `ray start --head`.
JOB_STOP_WAIT_S = 600


class LocalHead:
    def __init__(self, num_cpus: int | None = None, temp_dir: str | None = None):
        self.num_cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1  # 0: a head without actors
        self.owns_temp_dir = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rlvr-ray-")
        self.dashboard_port = free_port("127.0.0.1")
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        # The job driver and actors use this interpreter: `python` in the entrypoint resolves through PATH.
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", str(JOB_STOP_WAIT_S))}
        self.env.pop("RAY_ADDRESS", None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> "LocalHead":
        ports = {p: free_port("127.0.0.1") for p in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                                     "dashboard-agent-grpc-port", "metrics-export-port",
                                                     "runtime-env-agent-port", "node-manager-port",
                                                     "object-manager-port")}
        self.gcs_address = f"127.0.0.1:{ports['port']}"  # where more nodes join (bench/chaos.py)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               f"--num-cpus={self.num_cpus}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--temp-dir={self.temp_dir}", *(f"--{k}={v}" for k, v in ports.items())]
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.temp_dir)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.proc.returncode}; see {self.log.name}")
            try:
                req = urllib.request.Request(self.address + "/api/version",
                                             headers={"Authorization": "Bearer " + self.env["RAY_AUTH_TOKEN"]})
                urllib.request.urlopen(req, timeout=2).read()
                return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"ray head did not answer at {self.address} within {timeout_s:.0f}s; see {self.log.name}")

    def ray(self, *args: str, timeout_s: float = 120.0) -> str:
        """A `ray` CLI command against this head; its output (raises on failure)."""
        cmd = [str(Path(sys.executable).parent / "ray"), *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=True, timeout=timeout_s).stdout

    def submit(self, entrypoint: list[str], working_dir: str | Path = ROOT, timeout_s: float | None = None,
               stream=None, env: dict[str, str] | None = None, on_start=None) -> tuple[int, str]:
        """`ray job submit --working-dir ... -- <entrypoint>`; returns (the job's exit code, its log text). `env`
        goes into the job's runtime env; `on_start(job_id, cli)` is called once the CLI runs."""
        job_id = f"rlvr-{secrets.token_hex(4)}"
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.address,
               "--submission-id", job_id, "--working-dir", str(working_dir)]
        if env:
            cmd += ["--runtime-env-json", json.dumps({"env_vars": env})]
        # Its own session: a Ctrl-C in the terminal reaches us, and we stop the job cleanly (see `main`).
        proc = subprocess.Popen([*cmd, "--", *entrypoint], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if on_start is not None:
            on_start(job_id, proc)
        watchdog = threading.Timer(timeout_s, proc.kill) if timeout_s else None  # the log stream blocks reads
        if watchdog:
            watchdog.start()
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if stream is not None:
                try:
                    stream.write(line)
                    stream.flush()
                except (OSError, ValueError):  # the terminal went away (SIGHUP): keep collecting
                    stream = None
        proc.wait()
        if watchdog:
            watchdog.cancel()
            if proc.returncode < 0:
                raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s")
        text = "".join(lines)
        # The job's own exit code is only in its log: the driver's line for a clean stop (after which the CLI exits 0:
        # "was stopped"), Ray's line for a failure; otherwise the CLI exits 0 only when the job succeeded.
        code = re.search(r"stopped (?:after|before) step \d+.*\(exit code (\d+)\)", text) or \
            re.search(r"failed with exit code (\d+)", text)
        if code:
            return int(code.group(1)), text
        return (0 if proc.returncode == 0 else 1), text

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the head's process group (only the processes this head started), SIGKILL what remains."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the head leads its own group
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline and _group_alive(pgid):
                time.sleep(0.5)
            if not _group_alive(pgid):
                break
        self.proc.wait(timeout=5)
        self.proc = None
        self.log.close()
        if self.owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies of the group still "exist"; count only live members.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def absolute_output_dir(argv: list[str]) -> list[str]:
    """`make run` writes where it is run: a relative train.output_dir is anchored here (or under $RLVR_OUTPUT_ROOT)
    before the job sees it (see `launch.outputs`)."""
    from launch.config import load_config
    from launch.gsm8k import default_preset, parser
    from launch.outputs import resolve_output_dir

    if "-h" in argv or "--help" in argv:
        return argv
    args = parser().parse_args(argv)
    if args.dry_run or any(o.startswith("train.output_dir=") for o in args.overrides):
        return argv
    path = load_config(args.config or default_preset(), args.overrides).train.output_dir
    return argv if Path(path).expanduser().is_absolute() else [*argv, f"train.output_dir={resolve_output_dir(path)}"]


def say(text: str) -> None:
    """Print, unless the terminal is gone (SIGHUP): stopping cleanly matters more than the message."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: get `sig` when the parent (e.g. `make run`) dies, so killing make stops the job and the head too."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class JobStopper:
    """On SIGTERM/SIGINT/SIGHUP: ask the running job to stop (`ray job stop`: it checkpoints at the end of its step
    and exits); a second signal, or a job that has not ended `JOB_STOP_WAIT_S` later, ends the log stream at once."""

    def __init__(self, head: LocalHead):
        self.head, self.job_id, self.cli, self.signal = head, None, None, None

    def started(self, job_id: str, cli: subprocess.Popen) -> None:
        self.job_id, self.cli = job_id, cli
        if self.signal is not None:  # the signal came while the job was being submitted
            self._stop()

    def handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            say(f"[rlvr] {self.signal}: stopping the job (it writes a checkpoint at the end of its step)")
            self._stop()
        elif signum == signal.SIGINT and self.cli is not None:  # Ctrl-C again: do not wait for the checkpoint
            self.cli.kill()

    def _stop(self) -> None:
        if self.job_id is None:
            return

        def stop() -> None:
            try:
                self.head.ray("job", "stop", "--address", self.head.address, "--no-wait", self.job_id, timeout_s=60)
            except (subprocess.SubprocessError, OSError) as err:
                say(f"[rlvr] ray job stop failed ({err}); stopping the head")
                self.cli.kill()
                return
            deadline = threading.Timer(JOB_STOP_WAIT_S + 30, self.cli.kill)
            deadline.daemon = True
            deadline.start()

        threading.Thread(target=stop, daemon=True).start()


def main(argv: list[str]) -> int:
    die_with_parent()
    argv = absolute_output_dir(argv)
    head = LocalHead()
    stopper = JobStopper(head)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stopper.handle)
    try:
        head.start()
        code = 128 + signal.Signals[stopper.signal].value if stopper.signal else None
        if code is None:
            say(f"[rlvr] private Ray head at {head.address} (temp dir {head.temp_dir}, pid {head.proc.pid}); "
                "submitting the job")
            code, _ = head.submit(["python", "launch/gsm8k.py", *argv], stream=sys.stdout, on_start=stopper.started)
            say(f"[rlvr] job finished with exit code {code}; stopping the head it ran on")
    finally:
        head.stop()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
