"""What only an accelerator does, in one place: `Cuda` and its CPU twin `Cpu`, chosen by the device word.

Every call site (the learner, the engines' weight receiver, the weight protocol's sender, the benches and the GPU
check) goes through `for_device(device)`, so CI runs each call site on CPU with the twin, and on a GPU the same
lines reach CUDA. Nothing here synchronises more than its name says: `Mark.wait()` waits for the work queued on
the *current* stream up to the mark, never for the communication streams (NCCL runs on streams of its own, and a
device-wide synchronize would wait for a broadcast still on the wire, with no timeout).
"""
from __future__ import annotations

import os
import resource
import time

import torch


class Mark:
    """A point on the current stream (CPU: a point in time). `wait()` returns when the work queued before it is
    done, then the seconds since the previous mark of the same `Laps` are known."""

    def __init__(self, event=None):
        self.event = event

    def wait(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return time.perf_counter()


class Cpu:
    """The CPU twin: no streams, no device memory of its own (memory figures are this process's RSS)."""

    def set_device(self) -> torch.device:
        return torch.device("cpu")

    def mark(self) -> Mark:
        return Mark(None)

    def synchronize(self) -> None:
        """Everything queued on the device is done (CPU work is synchronous): for the end of a phase, never for
        timing a load while a collective is in flight (use `mark`)."""

    def reset_peak_memory(self) -> None:
        pass

    def peak_memory_bytes(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def rng_state(self):
        return None

    def set_rng_state(self, state) -> None:
        if state is not None:
            raise ValueError("a CUDA RNG state cannot be restored on a CPU rank (checkpoint from a GPU run?)")

    def device_name(self) -> str:
        return f"CPU ({os.cpu_count()} cores)"


class Cuda(Cpu):
    def set_device(self) -> torch.device:
        torch.cuda.set_device(0)  # Ray exposes an actor's GPU(s) as device 0 upwards
        return torch.device("cuda", 0)

    def mark(self) -> Mark:
        event = torch.cuda.Event()
        event.record()  # on the current stream: the loads and copies, not NCCL's streams
        return Mark(event)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        return torch.cuda.max_memory_allocated()

    def rng_state(self):
        return torch.cuda.get_rng_state()

    def set_rng_state(self, state) -> None:
        if state is not None:
            torch.cuda.set_rng_state(state)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(0)


_BY_TYPE = {"cpu": Cpu, "cuda": Cuda}


def for_device(device) -> Cpu:
    """The accelerator of a device word or torch.device ('cpu', 'cuda', 'cuda:0')."""
    kind = torch.device(device).type
    if kind not in _BY_TYPE:
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return _BY_TYPE[kind]()


class Laps:
    """Seconds per phase of a loop whose phases queue device work (e.g. wait for bytes, load, repack): each `lap`
    waits for the current stream up to now (`Mark.wait`) and adds the time since the previous lap to `key`."""

    def __init__(self, accel: Cpu, keys: tuple[str, ...]):
        self.accel = accel
        self.seconds = {k: 0.0 for k in keys}
        self.last = time.perf_counter()

    def lap(self, key: str) -> None:
        now = self.accel.mark().wait()
        self.seconds[key] += now - self.last
        self.last = now
