"""Tensor parallelism: the K ranks' process groups.

Rank 0 is the engine's process; ranks 1..K-1 are the workers it starts (distributed/worker.py).
They meet at a TCPStore that rank 0 serves on a free port the OS picks, on 127.0.0.1 when the
ranks are local processes, on rank 0's node address when Ray places them (across nodes), and
build two groups over the same K ranks, each rank's gloo bound to its own address. Both are
constructed directly, not through `torch.distributed.init_process_group`: nothing global is
set, so one process may hold several engines' groups, and K = 1 touches none of this.

- `device`: the forward's all-reduces; gloo on the CPU, nccl on CUDA (worker.rank_device). Its
  timeout (COLLECTIVE_TIMEOUT) bounds how long a rank waits for one that hangs mid-step; a rank
  that dies is noticed at once, since its connections close (gloo: "Connection closed by peer").
- `control`: gloo over TCP, rank 0's broadcast of each step's inputs. Workers wait in it while the
  engine is idle, so its timeout is a year: a dead rank 0 still ends their wait at once.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

LOCAL_HOST = "127.0.0.1"
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
IDLE_TIMEOUT = timedelta(days=365)


@dataclass
class TensorParallelGroup:
    """This process's place among the K tensor-parallel ranks, and the groups joining them."""

    rank: int  # 0: the engine; 1..size-1: its workers
    size: int  # K
    device: dist.Backend  # the forward's all-reduces (gloo or nccl)
    control: dist.Backend  # rank 0's step broadcasts (gloo)

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum `x` over the ranks, in place; every rank ends with the same values."""
        self.device.allreduce([x]).wait()
        return x

    def broadcast(self, obj: object = None) -> object:
        """Rank 0's `obj` (pickled) on every rank: its byte count, then its bytes. Workers pass
        nothing and get rank 0's object."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)  # [N]
            size = torch.tensor([data.numel()], dtype=torch.long)  # [1]
        else:
            size = torch.zeros(1, dtype=torch.long)
        self.control.broadcast([size], options).wait()
        if self.rank != 0:
            data = torch.empty(int(size), dtype=torch.uint8)
        self.control.broadcast([data], options).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def barrier(self) -> None:
        """Return once every rank has called it (on the control group: no rank is rushed, and
        one that died ends the wait with an error at once)."""
        self.control.allreduce([torch.zeros(1)]).wait()


def serve_store(host: str, size: int) -> dist.TCPStore:
    """Rank 0's rendezvous point, on a free port of `host` (`.port`); returns at once."""
    return dist.TCPStore(host, 0, size, True, COLLECTIVE_TIMEOUT, wait_for_workers=False)


def join_store(host: str, port: int, size: int) -> dist.TCPStore:
    """A worker's connection to rank 0's store."""
    return dist.TCPStore(host, port, size, False, COLLECTIVE_TIMEOUT)


def connect(store: dist.Store, rank: int, size: int, device: torch.device,
            host: str) -> TensorParallelGroup:
    """Build this rank's groups, gloo's over this rank's address `host`; returns once all
    `size` ranks have joined (or raises after COLLECTIVE_TIMEOUT)."""
    return TensorParallelGroup(rank, size,
                               _device_group(store, rank, size, device, host),
                               _gloo(dist.PrefixStore("control", store), rank, size, IDLE_TIMEOUT,
                                     host))


def _device_group(store: dist.Store, rank: int, size: int, device: torch.device,
                  host: str) -> dist.Backend:
    store = dist.PrefixStore("device", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return _gloo(store, rank, size, COLLECTIVE_TIMEOUT, host)


def _gloo(store: dist.Store, rank: int, size: int, timeout: timedelta,
          host: str) -> dist.Backend:
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, size, options)
