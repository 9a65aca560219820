"""Where the networks run: CUDA when present (with mixed precision), else the CPU."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch CPU threads (None: leave as is), restoring the count after.

    On a CPU shared with the GUI or other jobs, one thread is often faster than two: OpenMP
    threads spin-wait for each other when a core is taken.
    """
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def select_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; 'cpu' or 'cuda' force one (cuda without a GPU falls back to cpu)."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def describe_device(device: torch.device | None = None) -> str:
    """A short human name: 'CUDA: NVIDIA H100 80GB HBM3' or 'CPU (2 threads)'."""
    device = device or select_device()
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads)"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, max resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
