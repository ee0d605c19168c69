"""Shared pieces of the benchmarks: a bench-size model and a plain process that does one raw flat broadcast."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the repo, and tests/reference.py's shaped batches
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from core import weight_sync  # noqa: E402


def bench_model(hidden: int = 512, layers: int = 8) -> str:
    """A random Qwen2 of ~25M parameters (~100 MB fp32): large enough that a weight sync is not all overhead."""
    from core.models import _atomic_build, build_tiny_qwen2, cache_dir

    return str(_atomic_build(cache_dir() / f"bench-qwen2-h{hidden}-l{layers}",
                             lambda d: build_tiny_qwen2(d, hidden_size=hidden, num_layers=layers)))


def start_ray(num_cpus: int = 4) -> None:
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=1)
class FlatPeer:
    """A plain process in a weight group: one flat tensor, one broadcast; the baseline for a weight sync."""

    def address(self) -> tuple[str, int]:
        return "127.0.0.1", weight_sync.free_port("127.0.0.1")

    def join(self, host: str, port: int, world: int, rank: int) -> None:
        self.group = weight_sync.open_group("gloo", host, port, world, rank, 120)

    def broadcast(self, numel: int, rank: int, fresh: bool) -> float:
        if fresh:
            self.buf = torch.ones(numel) if rank == 0 else torch.empty(numel)
        elif getattr(self, "buf", None) is None or self.buf.numel() != numel:
            self.buf = torch.ones(numel)  # allocated and touched once: the timing is the wire alone
        start = time.perf_counter()
        weight_sync._broadcast(self.group, self.buf)
        return time.perf_counter() - start


def open_beside(peer_refs: list, host: str, port: int, world: int, rank: int):
    """Open this process's side of a weight group while Ray actors join theirs (every member must enter together)."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("g", weight_sync.open_group("gloo", host, port, world, rank, 120)))
    t.start()
    ray.get(peer_refs)
    t.join()
    return box["g"]


def raw_broadcast_seconds(numel: int, repeats: int = 3, driver_sends: bool = True, fresh: bool = False) -> float:
    """Fastest of `repeats` single flat fp32 broadcasts between this process and a plain actor.

    fresh=False: both ends reuse buffers that are already touched, so only the wire is timed (the strict baseline).
    fresh=True: the receiver allocates its buffer per broadcast (`dist.broadcast(torch.empty(n))`, page faults
    included), as a plain one-off broadcast does.
    """
    peer = FlatPeer.remote()
    host, port = "127.0.0.1", weight_sync.free_port("127.0.0.1")
    me, other = (0, 1) if driver_sends else (1, 0)
    group = open_beside([peer.join.remote(host, port, 2, other)], host, port, 2, me)
    times = []
    flat = torch.ones(numel)  # reused and already touched, as the peer's
    for _ in range(repeats + 1):  # the first round warms up the connection
        ref = peer.broadcast.remote(numel, other, fresh)
        if fresh and me == 1:
            flat = torch.empty(numel)
        start = time.perf_counter()
        weight_sync._broadcast(group, flat)
        ray.get(ref)
        times.append(time.perf_counter() - start)
    ray.kill(peer)
    return min(times[1:])
