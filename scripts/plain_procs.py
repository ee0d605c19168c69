"""Plain processes that each hold one object (what Ray's actors are in the job), for the GPU check's tier 1, which
runs where Ray is not installed: the learner ranks (`learner.worker.LearnerWorker`) and a plain-torch receiver of the
weight group. A call is sent down a pipe and its result (or the callee's traceback) comes back."""
from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _serve(conn, env: dict, module: str, cls: str, args: tuple) -> None:
    os.environ.update(env)  # before torch/DeepSpeed are imported, as Ray's runtime_env does
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import importlib

    obj = getattr(importlib.import_module(module), cls)(*args)
    conn.send(("ok", None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        method, a, kw = msg
        try:
            conn.send(("ok", getattr(obj, method)(*a, **kw)))
        except BaseException as err:  # noqa: BLE001 - sent back to the caller, who raises it with the traceback
            conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


class Proc:
    """An object of `module.cls(*args)` in a process of its own; `call` sends a method call, `result` waits."""

    def __init__(self, module: str, cls: str, args: tuple = (), env: dict | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, env or {}, module, cls, args), daemon=True)
        self.proc.start()
        self.result(120)

    def call(self, method: str, *args, **kwargs) -> "Proc":
        self.conn.send((method, args, kwargs))
        return self

    def result(self, timeout_s: float = 600):
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"no answer from pid {self.proc.pid} within {timeout_s:.0f}s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def gather(procs: list[Proc], timeout_s: float = 600) -> list:
    return [p.result(timeout_s) for p in procs]


class Receiver:
    """A plain-torch member of the weight group (what an engine worker does, without vLLM): receives every bucket
    into rotating buffers on its device and returns a checksum per tensor."""

    def __init__(self, device: str):
        import torch

        from core import accel

        self.device = accel.for_device(device).set_device()
        self.group = None
        torch.manual_seed(0)

    def open(self, backend: str, host: str, port: int, world: int, rank: int, timeout_s: float, plan: list) -> int:
        from core import weight_sync

        weight_sync.close_group(self.group)
        self.plan = plan
        rotating = weight_sync.RotatingBuffers(plan, self.device)
        self.buffers = [rotating.next(b) for b in plan]
        self.group = weight_sync.open_group(backend, host, port, world, rank, timeout_s)
        return rank

    def close(self) -> None:
        from core import weight_sync

        weight_sync.close_group(self.group)
        self.group = None

    def receive(self, version: int) -> dict[str, float]:
        from core import weight_sync

        sums = {}
        for _, tensors in weight_sync.receive_buckets(self.group, self.plan, self.device, version, self.buffers):
            sums.update((n, t.double().sum().item()) for n, t in tensors)
        return sums
