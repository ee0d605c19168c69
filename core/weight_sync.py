"""The weight protocol between learner rank 0 (the sender) and every engine worker (the receivers).

Both sides import this module, so they cannot drift:
- one process group of world size 1 + engines × TP: learner rank 0 is rank 0, engine i's TP worker r is
  rank 1 + i·TP + r; backend `gloo` on CPU, `nccl` on GPU; rendezvous over a TCP store at the sender's address;
- the plan (which tensor sits where in which flat bucket) is made once by the sender from the HF parameter names
  and handed to each receiver when the group opens; a sync then broadcasts a 3-int header
  (magic, version, plan digest) followed by the flat buckets, in plan order;
- every side enters a collective from the same driver call, and every wait is bounded by the group's timeout on
  both backends: a missing, dead or stopped peer raises `TimeoutError` instead of hanging. (NCCL's `wait()` does not
  block the host by default, so the NCCL group is made in blocking-wait mode, where it does, with the timeout.)
- a group whose sync failed is closed (`close_group`) on every member and a new one is opened over the new
  membership, on a fresh port: nothing of the old one is reused.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from core import accel

MAGIC = 0x5EED_5EED
BACKEND_FOR_DEVICE = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class TensorSpec:
    name: str  # Hugging Face parameter name (what vLLM's load_weights maps)
    shape: tuple[int, ...]
    offset: int  # in elements, inside the bucket
    numel: int


@dataclass(frozen=True)
class Bucket:
    dtype: str  # e.g. "bfloat16"; one dtype per flat buffer
    numel: int
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def plan_buckets(params: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], bucket_bytes: int) -> list[Bucket]:
    """Pack (name, dtype, shape) into flat buckets of at most `bucket_bytes` (a larger tensor gets its own).

    Within each dtype, tensors keep the given order, except that each block's tensors of one kind sit side by
    side: `self_attn.{q,k,v,o}_proj.weight`, then `self_attn.{q,k,v}_proj.bias`. Projections that vLLM fuses
    (q/k/v into qkv_proj, gate/up into gate_up_proj) are then one contiguous run of a bucket, which a CPU engine
    receives straight into its weights (see `rollout.worker_extension.alias_weights`).
    """
    params = list(params)
    first: dict[tuple[str, ...], int] = {}
    keys = []
    for i, (name, _, _) in enumerate(params):
        module, _, kind = name.rpartition(".")
        block = module.rpartition(".")[0]
        keys.append((first.setdefault((block,), i), first.setdefault((block, kind), i), i))
    params = [p for _, p in sorted(zip(keys, params), key=lambda kp: kp[0])]
    by_dtype: dict[str, list[list[TensorSpec]]] = {}
    fill: dict[str, int] = {}
    for name, dtype, shape in params:
        key = str(dtype).removeprefix("torch.")
        numel = 1
        for d in shape:
            numel *= int(d)
        size = numel * torch.empty((), dtype=getattr(torch, key)).element_size()
        buckets = by_dtype.setdefault(key, [[]])
        if buckets[-1] and fill[key] + size > bucket_bytes:
            buckets.append([])
            fill[key] = 0
        offset = sum(t.numel for t in buckets[-1])
        buckets[-1].append(TensorSpec(name, tuple(int(d) for d in shape), offset, numel))
        fill[key] = fill.get(key, 0) + size
    return [Bucket(dtype, sum(t.numel for t in specs), tuple(specs))
            for dtype, groups in by_dtype.items() for specs in groups if specs]


def plan_digest(plan: list[Bucket]) -> int:
    """A stable 62-bit fingerprint of the plan; the header carries it so a receiver holding another plan stops."""
    text = repr([(b.dtype, b.numel, [(t.name, t.shape, t.offset) for t in b.tensors]) for b in plan])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


@dataclass
class WeightGroup:
    """An open weight group: the process group and the TCP store that must outlive it."""

    pg: object
    store: object
    rank: int
    world_size: int
    timeout: datetime.timedelta


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_group(backend: str, host: str, port: int, world_size: int, rank: int, timeout_s: float) -> WeightGroup:
    """Join the weight group. All `world_size` members must call this at the same time."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout,
                              wait_for_workers=True)
    except Exception as err:  # noqa: BLE001 - re-raised with what the user needs to know
        raise TimeoutError(
            f"weight group rendezvous at {host}:{port} failed for rank {rank}/{world_size} within {timeout_s:.0f}s: "
            f"are the learner and all {world_size - 1} engine workers alive and entering together? ({err})"
        ) from err
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if loopback
                         else dist.ProcessGroupGloo.create_default_device()]
        pg = dist.ProcessGroupGloo(store, rank, world_size, opts)
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        # Blocking wait: `work.wait()` then blocks the host until the collective is done, and raises (aborting the
        # communicator) past the timeout, instead of NCCL's watchdog ending the process. Read at construction.
        saved = os.environ.get("TORCH_NCCL_BLOCKING_WAIT")
        os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "1"
        try:
            pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        finally:
            if saved is None:
                os.environ.pop("TORCH_NCCL_BLOCKING_WAIT")
            else:
                os.environ["TORCH_NCCL_BLOCKING_WAIT"] = saved
    else:
        raise ValueError(f"weight sync backend must be gloo or nccl, got {backend!r}")
    group = WeightGroup(pg, store, rank, world_size, timeout)
    # One tiny broadcast while every member is known to be here: NCCL creates its communicator lazily, so a
    # transport problem shows up now, at open, rather than in the middle of training.
    _broadcast(group, torch.zeros(1, device="cuda" if backend == "nccl" else "cpu"))
    return group


def close_group(group: WeightGroup | None) -> None:
    """Tear a group down on this member: abort its collectives and drop the communicator and the TCP store (the
    sender's store is the rendezvous server; it closes when the last reference goes). Safe on a failed group."""
    if group is None:
        return
    try:
        group.pg.abort()
    except Exception:  # noqa: BLE001 - a broken group may refuse; it is dropped either way
        pass
    group.pg = group.store = None


def _start(group: WeightGroup, tensor: torch.Tensor):
    """Issue a broadcast from rank 0 without waiting (gloo and NCCL both progress it in the background)."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    return group.pg.broadcast([tensor], opts)


def _wait(group: WeightGroup, work, numel: int) -> None:
    try:
        work.wait(group.timeout)
    except RuntimeError as err:
        # The group is broken: abort its collectives here (a peer still waiting on another member ends at its own
        # timeout, so a failed sync ends for everyone within the group's timeout). The driver then closes the group
        # on every member and opens a new one.
        try:
            group.pg.abort()
        except Exception:  # noqa: BLE001 - already failing; the TimeoutError below says why
            pass
        raise TimeoutError(f"weight broadcast failed on rank {group.rank}/{group.world_size} ({numel} elements): a "
                           f"peer is missing, stopped, or did not enter this sync in time ({err})") from err


def _broadcast(group: WeightGroup, tensor: torch.Tensor) -> None:
    _wait(group, _start(group, tensor), tensor.numel())


def _header(version: int, digest: int, device) -> torch.Tensor:
    return torch.tensor([MAGIC, version, digest], dtype=torch.int64, device=device)


def send(group: WeightGroup, plan: list[Bucket], version: int, flat_buckets: Iterable[torch.Tensor], device) -> int:
    """Sender side: the header, then each flat bucket. Buckets are produced lazily (packed, or gathered under
    ZeRO-3), and bucket k+1 is produced while bucket k is on the wire.

    On CPU the packing runs on one thread: a memcpy gains little from more, and idle OpenMP threads spinning after
    each copy would take cores from the receivers loading the previous bucket (measured: 2× slower syncs on 2 cores).
    """
    threads = torch.get_num_threads()
    if str(device) == "cpu":
        torch.set_num_threads(1)
    try:
        return _send(group, plan, version, flat_buckets, device)
    finally:
        torch.set_num_threads(threads)


def _send(group: WeightGroup, plan: list[Bucket], version: int, flat_buckets: Iterable[torch.Tensor], device) -> int:
    _broadcast(group, _header(version, plan_digest(plan), device))
    sent, in_flight = 0, None
    for bucket, flat in zip(plan, flat_buckets, strict=True):
        if flat.numel() != bucket.numel or str(flat.dtype).removeprefix("torch.") != bucket.dtype:
            raise ValueError(f"bucket mismatch: planned {bucket.numel} {bucket.dtype}, got {flat.numel()} {flat.dtype}")
        work = _start(group, flat)
        if in_flight is not None:
            _wait(group, in_flight[0], in_flight[1].numel())
        in_flight = (work, flat)  # the buffer stays referenced until its broadcast is done
        sent += flat.numel() * flat.element_size()
    if in_flight is not None:
        _wait(group, in_flight[0], in_flight[1].numel())
    accel.for_device(device).synchronize()  # every broadcast is done: this waits for nothing on the wire
    return sent


class RotatingBuffers:
    """Two rotating flat buffers per dtype, reused across syncs. The sender packs the next bucket into one while the
    other is on the wire; a GPU receiver receives the next bucket into one while it loads from the other (the
    loaders copy, and NCCL orders a broadcast after the copies already queued on the stream). No sync pays for
    fresh allocations, and a receiver holds two buckets, not a second copy of the model."""

    def __init__(self, plan: list[Bucket], device):
        self.buffers = {}
        for dtype in {b.dtype for b in plan}:
            size = max(b.numel for b in plan if b.dtype == dtype)
            self.buffers[dtype] = [torch.empty(size, dtype=getattr(torch, dtype), device=device) for _ in range(2)]
        self.turn = 0

    def next(self, bucket: Bucket) -> torch.Tensor:
        self.turn ^= 1
        return self.buffers[bucket.dtype][self.turn][:bucket.numel]


def pack(bucket: Bucket, tensors_by_name: dict[str, torch.Tensor], device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy a bucket's tensors into one flat buffer (`out`, e.g. from RotatingBuffers, or a fresh one)."""
    flat = out if out is not None else torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=device)
    for spec in bucket.tensors:
        flat[spec.offset:spec.offset + spec.numel].copy_(tensors_by_name[spec.name].reshape(-1))
    return flat


def receive_buckets(group: WeightGroup, plan: list[Bucket], device, expect_version: int | None = None,
                    buffers: list[torch.Tensor] | None = None) -> Iterator[tuple[int, list[tuple[str, torch.Tensor]]]]:
    """Receiver side: check the header, then yield (bucket index, [(name, tensor view), ...]) as each bucket
    arrives. Bucket k+1 is already on the wire while the caller loads bucket k.

    `buffers` (one per bucket, reused across syncs) are received into when given: views of `RotatingBuffers`, or one
    buffer per bucket where the weights themselves live in the buffers (`alias_weights` on CPU engines).
    """
    header = _header(0, 0, device)
    _broadcast(group, header)
    magic, version, digest = (int(x) for x in header.tolist())
    if magic != MAGIC or digest != plan_digest(plan):
        raise RuntimeError(f"weight sync header mismatch (magic {magic:#x}, digest {digest}): the sender's parameter "
                           f"plan differs from this engine's; were they built from the same model?")
    if expect_version is not None and version != expect_version:
        raise RuntimeError(f"weight sync: sender sent version {version}, engine expected {expect_version}")

    def start(k: int):
        flat = buffers[k] if buffers else torch.empty(plan[k].numel, dtype=getattr(torch, plan[k].dtype), device=device)
        return flat, _start(group, flat)

    pending = start(0) if plan else None
    for k, bucket in enumerate(plan):
        flat, work = pending
        _wait(group, work, bucket.numel)
        pending = start(k + 1) if k + 1 < len(plan) else None
        yield k, [(spec.name, flat[spec.offset:spec.offset + spec.numel].view(spec.shape)) for spec in bucket.tensors]


def receive(group: WeightGroup, plan: list[Bucket], device, expect_version: int | None = None,
            buffers: list[torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`receive_buckets`, one (name, tensor view) at a time."""
    for _, tensors in receive_buckets(group, plan, device, expect_version, buffers):
        yield from tensors
