"""Distributed helpers that also work in a single plain-python process (DeiT/MAE style)."""
from __future__ import annotations

import datetime
import fcntl
import os
import re
import socket
import struct
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a rendezvous this process starts itself."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun/srun/submitit, pick this rank's device.

    Reads the standard env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Under plain python
    nothing is initialised and the helpers above report rank 0 of 1.
    """
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if use_cuda:
        torch.cuda.set_device(get_local_rank())
        dev = torch.device("cuda", get_local_rank())
    else:
        dev = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_dist():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if use_cuda else None,
        )
    return dev


def route_interface(host: str) -> str | None:
    """The network interface this machine reaches `host` through (on `host` itself: the one holding its
    address), e.g. for GLOO_SOCKET_IFNAME; None when `host` does not resolve or has no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP: nothing is sent, the kernel only picks the route and source address
            source = s.getsockname()[0]
            for _, name in socket.if_nameindex():
                try:  # SIOCGIFADDR: the interface's IPv4 address
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue  # no IPv4 address
                if socket.inet_ntoa(packed[20:24]) == source:
                    return name
    except OSError:
        return None
    return None


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


# What gloo's collectives raise when another rank's process is gone (NCCL reports it in its own words).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_gone(exc: BaseException) -> str | None:
    """The gist of `exc` ("Read error [10.0.0.2]:41234: Connection reset by peer") when a collective failed
    because another rank's process is gone (crashed, killed, its node lost); None for any other error."""
    if not isinstance(exc, RuntimeError):
        return None
    line = next((line for line in str(exc).splitlines() if any(m in line for m in PEER_GONE)), None)
    if line is None:
        return None
    return re.sub(r"^\[[^\]]*:\d+\] ", "", line).split(". ")[0]  # without gloo's "[pair.cc:561] " and advice


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op single-process); returns t for chaining."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank passes its object; rank 0 gets the list by rank, others None.

    Uses gather_object, so memory on rank 0 is the sum of what ranks send: send compact objects
    (numpy arrays of scores, not full embeddings).
    """
    if not is_dist():
        return [obj]
    out = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    DDP syncs buffers at the start of each training forward, so after the last step each rank
    holds statistics updated by its own last batch; evaluating or saving must use one model.
    """
    if is_dist():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
