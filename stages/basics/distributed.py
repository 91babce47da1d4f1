"""Data-parallel training over torch.distributed: who this process is, and the few collectives an SAE's
batch statistics need so that N ranks, each holding a disjoint 1/N of the global batch, train the SAE
that one process would train on the whole batch.

Every helper is the identity when no process group is running, so the SAEs and the training loop call
them unconditionally. Processes are started by torchrun (or `saepipe train --nproc N`, which runs it),
which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

Batch statistics: a rank's loss is a mean over its own rows, and DDP averages the ranks' gradients,
which gives the global batch's gradient for every term linear in per-row losses. A term that is a
non-linear function of a batch mean (a normalizer, a penalty on the batch's mean L0) must see the
global mean instead: `global_mean` gives its value, while its gradient flows through the local mean,
so the average over ranks is the gradient of the global expression.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from stages.basics.errors import SaepipeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The rank that writes files, logs and shows progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_type: str) -> World:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a single World otherwise."""
    if not launched_by_torchrun():
        return World()
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine's CPU share its cores (torchrun's own default is one thread each).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launch(nproc: int, entrypoint, *args):
    """Run `entrypoint(*args)` in `nproc` processes on this machine through torch's elastic launcher (what
    torchrun --standalone runs); returns rank 0's result. A failed rank stops them all."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=f"saepipe-{os.getpid()}",
        max_restarts=0,
    )
    try:
        return elastic_launch(config, entrypoint)(*args)[0]
    except ChildFailedError as e:
        failure = next(iter(e.failures.values()))
        # the rank's error record: {"message": "Type: text", "extraInfo": {traceback...}}, or a plain string
        message = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        raise SaepipeError(
            f"a training process failed ({message or f'exit code {failure.exitcode}'}); its traceback is above"
        ) from None


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` as rank `src` has it (e.g. a decision only the main rank may take, like preparing the run folder)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (e.g. fire counts, so every rank sees the same dead latents)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def max_(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def min_(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def global_mean(local: torch.Tensor) -> torch.Tensor:
    """A mean over this rank's rows -> the mean over every rank's rows (ranks hold equally many). Its
    value is global; its gradient is the local mean's, which DDP's averaging turns into the global one."""
    if not active():
        return local
    total = mean_(local.detach().clone())
    return local + (total - local.detach())


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of `values` over every rank's (k counts all ranks' entries together), a
    0-dim tensor. Each rank contributes only its own k largest: no entry beyond those can be among the
    global k largest."""
    local = values.flatten()
    top = local.topk(min(k, local.numel()), sorted=False).values
    if active():
        gathered = [torch.empty_like(top) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, top)
        top = torch.cat(gathered)
    if k > top.numel():
        raise ValueError(f"asked for the {k}-th largest of {top.numel()} values")
    if top.numel() > k:  # several ranks' candidates
        top = top.topk(k, sorted=False).values
    return top.min()


def check_divides(batch_size: int, size: int) -> None:
    if batch_size % size:
        raise SaepipeError(
            f"--batch-size {batch_size} does not split evenly over {size} processes: use a multiple of {size}"
        )
