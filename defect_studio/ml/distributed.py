"""Training on several processes with torch.distributed (launched by `torchrun`).

`Ranks` is what a training job needs to know about its process group: its rank, the world size and the
few collectives the classifier uses (sharding a list of images, gathering per-shard rows back in the
original order, agreeing on a flag or on rank 0's value). A single process uses `Ranks.single()`,
whose collectives are the identity, so the training code has one path.

Who writes what: rank 0 alone opens the project (its lock, its database) and writes the checkpoint;
the other ranks receive the image list, tags and validation split from rank 0 and only read images.
Before anything is written, `check_shared_folder` proves that every rank sees rank 0's project
folder (a token file rank 0 writes and every rank reads back) and every image it will read.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from defect_studio.atomic import TEMP_SUFFIX, atomic_write_text
from defect_studio.errors import DataError
from defect_studio.jobs import CancelToken, JobCancelled

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True in a worker process that torchrun (torch.distributed.run) started with more than one rank."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def backend_for(device: str) -> str:
    """nccl for CUDA devices (the fast GPU collectives), gloo on the CPU."""
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int = 0
    collective_device: str = "cpu"  # where the backend's collectives run: 'cuda:<local rank>' for nccl

    @classmethod
    def single(cls) -> "Ranks":
        return cls(rank=0, world_size=1, local_rank=0)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes checkpoints and the project database."""
        return self.rank == 0

    def shard(self, count: int) -> list[int]:
        """This rank's indices of `count` items: every world_size-th one, starting at its rank."""
        return list(range(self.rank, count, self.world_size))

    def gather_rows(self, local: torch.Tensor, count: int, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """The rows of all ranks' shards (`shard(count)` each) back in their original order, on every rank.

        Exchanged in chunks of about `chunk_bytes` per rank, so a large feature cache needs little memory
        beyond its own copy (and little GPU memory when nccl carries it)."""
        if not self.distributed:
            return local
        per_rank = -(-count // self.world_size)  # shards differ by at most one row: pad to the longest
        row_shape = tuple(local.shape[1:])
        out = torch.empty((per_rank * self.world_size, *row_shape), dtype=local.dtype, device=local.device)
        row_bytes = 4 * max(1, math.prod(row_shape))  # float32 on the wire
        rows_per_chunk = max(1, chunk_bytes // row_bytes)
        for first in range(0, per_rank, rows_per_chunk):
            last = min(per_rank, first + rows_per_chunk)
            block = torch.zeros((last - first, *row_shape), dtype=torch.float32, device=self.collective_device)
            mine = local[first:last]
            block[: len(mine)] = mine.to(device=self.collective_device, dtype=torch.float32)  # gloo: no float16
            pieces = [torch.empty_like(block) for _ in range(self.world_size)]
            torch.distributed.all_gather(pieces, block)
            # Row j of rank r's shard is item j * world_size + r: interleave the shards.
            interleaved = torch.stack(pieces, dim=1).reshape((last - first) * self.world_size, *row_shape)
            out[first * self.world_size : last * self.world_size] = interleaved.to(device=local.device, dtype=local.dtype)
        return out[:count]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank (a cancel, a stop)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.collective_device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def share_buffers_of_rank0(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, so that every rank evaluates the
        model rank 0 will save (a guard: global-batch BatchNorm keeps them equal, per-rank BatchNorm would not)."""
        if not self.distributed:
            return
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)

    def share_model_of_rank0(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank: the weights rank 0 alone loaded (a warm start, a
        classifier's encoder) start every rank's copy."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)

    def sum_with_gradient(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks, differentiable: a loss built from global sums (of pixels over
        the whole global batch) is the loss one process would compute, and so are its gradients once
        DistributedDataParallel averages them."""
        return _SumOverRanks.apply(tensor) if self.distributed else tensor

    def raise_if_cancelled(self, cancel: "CancelToken") -> None:
        """A cancel on any rank stops every rank at the same step (a lone rank leaving would hang the others)."""
        if self.any(cancel.cancelled):
            raise JobCancelled("cancelled by the user")

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sums of `values` over the ranks, on every rank."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64, device=self.collective_device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def share_tensor_lists(self, owned: dict[int, list[torch.Tensor]], wanted: Sequence[int],
                           count: int) -> dict[int, list[torch.Tensor]]:
        """Item i of `count` (a list of CPU tensors of any shapes and dtypes) is owned by rank `i % world_size`
        (the items of `shard`): every rank passes the items it owns and the ones it `wanted`, and gets the
        wanted ones from their owners, one broadcast per tensor, exact (float16 travels as float32: gloo
        carries no float16)."""
        if not self.distributed:
            return {}
        layouts = {}  # item -> [(shape, dtype)] of its tensors, from its owner
        for rank_layouts in self.gather_objects({i: [(tuple(t.shape), t.dtype) for t in tensors]
                                                 for i, tensors in owned.items()}):
            layouts.update(rank_layouts)
        needed = sorted({i for rank_wanted in self.gather_objects(sorted(wanted)) for i in rank_wanted})
        wanted_here = set(wanted)
        received = {}
        for index in needed:
            owner = index % self.world_size
            tensors = []
            for position, (shape, dtype) in enumerate(layouts[index]):
                wire = torch.float32 if dtype == torch.float16 else dtype
                if owner == self.rank:
                    buffer = owned[index][position].to(device=self.collective_device, dtype=wire).contiguous()
                else:
                    buffer = torch.empty(shape, dtype=wire, device=self.collective_device)
                torch.distributed.broadcast(buffer, src=owner)
                tensors.append(buffer.to(device="cpu", dtype=dtype))
            if index in wanted_here:
                received[index] = tensors
        return received

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over all ranks; its gradient is the sum of the ranks' gradients (each rank's
    loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch (all ranks' parts), as in one
    process. torch's SyncBatchNorm does this on GPUs only; this one runs on any backend (gloo on the CPU):
    one all-reduce of the per-channel sums, autograd-aware, so the gradients are the global batch's too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.distributed.is_initialized() or self.momentum is None:
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        values = x.float()
        channels = values.shape[1]
        count = torch.tensor([values.numel() / channels], device=values.device)
        # One all-reduce of the sums of (x - shift) and (x - shift)^2: with the running mean as the shift
        # (the same on every rank, close to the batch mean) the variance loses no precision to cancellation.
        shift = self.running_mean.detach().float().view(1, channels, 1, 1) if self.track_running_stats else 0.0
        deviation = values - shift
        sums = all_reduce(torch.cat([deviation.sum(dim=(0, 2, 3)), (deviation * deviation).sum(dim=(0, 2, 3)), count]))
        total = sums[-1]
        mean_deviation = sums[:channels] / total
        variance = (sums[channels : 2 * channels] / total - mean_deviation * mean_deviation).clamp_min(0.0)
        mean = mean_deviation + (shift.view(channels) if self.track_running_stats else 0.0)
        centred = values - mean.view(1, channels, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = variance * (total / (total - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.to(self.running_var.dtype))
                self.num_batches_tracked.add_(1)
        shape = (1, channels, 1, 1)
        out = centred * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def with_global_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding the same parameters and
    buffers (the state_dict, and so the checkpoint, is unchanged)."""
    if type(module) is torch.nn.BatchNorm2d:
        replacement = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            replacement.weight, replacement.bias = module.weight, module.bias
        replacement.running_mean, replacement.running_var = module.running_mean, module.running_var
        replacement.num_batches_tracked = module.num_batches_tracked
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        module.add_module(name, with_global_batch_norm(child))
    return module


def data_parallel(module: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """`module` for the training steps: itself in one process, else its DistributedDataParallel wrapper
    (gradients of the trainable parameters averaged over the ranks; frozen ones have none), with BatchNorm
    statistics over the global batch as in one process: torch's SyncBatchNorm on GPUs, GlobalBatchNorm2d
    elsewhere (SyncBatchNorm refuses CPU tensors). The state_dict of `module` is unchanged."""
    if not ranks.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(torch.nn.SyncBatchNorm.convert_sync_batchnorm(module), device_ids=[index])
    return DistributedDataParallel(with_global_batch_norm(module))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[Ranks, str]]:
    """Join torchrun's process group; yields the ranks and this rank's device ('cuda:<local rank>' or 'cpu')."""
    import datetime

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(device)
    rank_device = "cpu"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DataError(f"{int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1))} processes on {socket.gethostname()}, "
                            f"which has {torch.cuda.device_count()} GPU(s): start one process per GPU (or --device cpu).")
        torch.cuda.set_device(local_rank)
        rank_device = f"cuda:{local_rank}"
    # A rank that fails while the others wait in a collective ends the run through torchrun; the
    # timeout is the last resort for a rank that hangs without failing.
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield Ranks(rank=rank, world_size=world_size, local_rank=local_rank, collective_device=rank_device), rank_device
    finally:
        torch.distributed.destroy_process_group()


def _where() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


def check_shared_folder(ranks: Ranks, project_dir: Path, image_paths: Sequence[Path]) -> None:
    """Refuse (DataError on every rank) unless every rank sees rank 0's project folder and every image.

    Rank 0 writes a fresh random token into the project's cache folder; each rank reads it back at the
    path rank 0 named. A rank on another machine without the shared folder, or with a copy of the
    project, does not find that token. Nothing else has been written yet, and the token is removed
    whatever the outcome (a crash leaves it as a `.partial` temporary, removed on the next open).
    """
    if not ranks.distributed:
        return
    token_path: Path | None = None
    token, write_problem = "", None
    if ranks.is_writer:
        token = secrets.token_hex(16)
        token_path = project_dir / "cache" / f".distributed-check-{token}{TEMP_SUFFIX}"
        try:
            token_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(token_path, token)
        except OSError as error:
            write_problem = f"cannot write in {project_dir} ({error.strerror or error})"
    try:
        shared_path, token, write_problem = ranks.from_rank0((token_path, token, write_problem))
        problem = write_problem or _visibility_problem(Path(shared_path), token, project_dir, image_paths)
        problems = ranks.gather_objects(None if problem is None else f"rank {ranks.rank} on {_where()}: {problem}")
    finally:
        if token_path is not None:
            # Every rank has read the token once gather_objects returned (or this rank failed first).
            with contextlib.suppress(OSError):
                token_path.unlink()
    failures = [p for p in problems if p]
    if failures:
        raise DataError(
            "distributed training needs the project folder and its images on storage that every process "
            "sees at the same path (a shared file system); refused before anything was written:\n  "
            + "\n  ".join(failures)
        )


def _visibility_problem(token_path: Path, token: str, project_dir: Path, image_paths: Sequence[Path]) -> str | None:
    if not project_dir.is_dir():
        return f"no project folder at {project_dir}"
    try:
        seen = token_path.read_text(encoding="utf-8")
    except OSError:
        return f"{project_dir} is not the folder rank 0 opened (its check file {token_path.name} is missing here)"
    if seen != token:
        return f"{project_dir} is not the folder rank 0 opened (its check file differs)"
    for path in image_paths:
        if not os.access(path, os.R_OK):
            return f"cannot read the image {path}"
    return None


def torchrun_command(nproc: int, module_arguments: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run` on this machine with `nproc` workers running
    `python -m defect_studio <module_arguments>`; `--standalone` lets the c10d rendezvous pick a free port."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "defect_studio", *module_arguments]
