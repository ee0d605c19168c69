"""Run the job the way a cluster user does, on this machine: start a private Ray head, `ray job submit` to it,
stream the logs, stop that head, exit with the job's status.

    python -m launch.local_job [--config PRESET] [key.sub=value ...]

The head binds to 127.0.0.1 with its own free ports, its own temp dir and its own auth token, runs in its own
process session, and is stopped by that session's process group: nothing else on the machine is touched (no
`ray stop`, which would kill every Ray process of the user).
"""
from __future__ import annotations

import os
import re
import secrets
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


class LocalHead:
    def __init__(self, num_cpus: int | None = None, temp_dir: str | None = None):
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rlvr-ray-")
        self.dashboard_port = free_port("127.0.0.1")
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        # The job driver and actors use this interpreter: `python` in the entrypoint resolves through PATH.
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env.pop("RAY_ADDRESS", None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> "LocalHead":
        ports = {p: free_port("127.0.0.1") for p in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                                     "dashboard-agent-grpc-port", "metrics-export-port",
                                                     "runtime-env-agent-port", "node-manager-port",
                                                     "object-manager-port")}
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

    def submit(self, entrypoint: list[str], working_dir: str | Path = ROOT, timeout_s: float | None = None,
               stream=None) -> tuple[int, str]:
        """`ray job submit --working-dir ... -- <entrypoint>`; returns (the job's exit code, its log text)."""
        job_id = f"rlvr-{secrets.token_hex(4)}"
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", self.address,
               "--submission-id", job_id, "--working-dir", str(working_dir), "--", *entrypoint]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(timeout_s, proc.kill) if timeout_s else None  # the log stream blocks reads
        if watchdog:
            watchdog.start()
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if stream is not None:
                stream.write(line)
                stream.flush()
        proc.wait()
        if watchdog:
            watchdog.cancel()
            if proc.returncode < 0:
                raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s")
        text = "".join(lines)
        if proc.returncode == 0:  # the CLI exits 0 only when the job succeeded
            return 0, text
        code = re.search(r"failed with exit code (\d+)", text)  # the job's own code is only in its log
        return (int(code.group(1)) if code else 1), text

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
    """A relative train.output_dir would land in the job's unpacked copy of the working dir: anchor it here."""
    from launch.config import load_config
    from launch.gsm8k import default_preset, parser

    if "-h" in argv or "--help" in argv:
        return argv
    args = parser().parse_args(argv)
    if args.dry_run or any(o.startswith("train.output_dir=") for o in args.overrides):
        return argv
    out = Path(load_config(args.config or default_preset(), args.overrides).train.output_dir)
    return argv if out.is_absolute() else [*argv, f"train.output_dir={Path.cwd() / out}"]


def main(argv: list[str]) -> int:
    argv = absolute_output_dir(argv)
    with LocalHead() as head:
        print(f"[rlvr] private Ray head at {head.address} (temp dir {head.temp_dir}); submitting the job", flush=True)
        code, _ = head.submit(["python", "launch/gsm8k.py", *argv], stream=sys.stdout)
        print(f"[rlvr] job finished with exit code {code}; stopping the head it ran on", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
