"""The good-image prior: how unlike every good image each location of an image looks.

The project's good images are plentiful and free. Their features at one stage of the classifier
(EfficientNet-Lite0's stride-16 stage by default), averaged over each cell's 3×3 neighbourhood, form a
memory bank; a location's prior is its distance to the nearest bank vector (PatchCore's idea). The
bank is a greedy k-centre coreset of all good locations: bounded memory and a fixed cost per query,
while every kind of good texture keeps a representative. It is built at the end of classifier training
from the features training already computed and stored in the classifier's checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.nn import functional as F

PROJECTION_DIMS = 32  # coreset selection runs on a random projection: distances are kept (Johnson-Lindenstrauss)
MAX_CANDIDATES = 65536  # locations the coreset is chosen from (a random subset beyond that)
QUERY_CHUNK = 4096


@dataclass
class GoodImagePrior:
    stage: int  # 1-based stage whose activations are compared
    bank: torch.Tensor  # M×C float32 coreset of good locations' features
    neighbourhood: int = 3  # cells averaged around each location before comparing

    def to_payload(self) -> dict[str, Any]:
        return {"stage": self.stage, "bank": self.bank.to(torch.float16).contiguous(), "neighbourhood": self.neighbourhood}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "GoodImagePrior":
        return cls(int(payload["stage"]), payload["bank"].float(), int(payload.get("neighbourhood", 3)))


def local_features(activation: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """B×C×h×w -> each cell averaged with its neighbours (padding not counted)."""
    if neighbourhood <= 1:
        return activation.float()
    return F.avg_pool2d(activation.float(), neighbourhood, 1, neighbourhood // 2, count_include_pad=False)


def _flatten_locations(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def greedy_coreset(vectors: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of `size` vectors chosen by greedy k-centre (each pick the farthest from those picked)."""
    count = vectors.shape[0]
    if count <= size:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    projected = vectors
    if vectors.shape[1] > PROJECTION_DIMS:
        projection = torch.randn(vectors.shape[1], PROJECTION_DIMS, generator=generator) / math.sqrt(PROJECTION_DIMS)
        projected = vectors @ projection
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(count, (1,), generator=generator))
    nearest = torch.full((count,), math.inf)
    for index in range(1, size):
        step = ((projected - projected[chosen[index - 1]]) ** 2).sum(dim=1)
        torch.minimum(nearest, step, out=nearest)
        chosen[index] = int(torch.argmax(nearest))
    return chosen


def build_good_prior(
    activations: Iterable[torch.Tensor], stage: int, bank_size: int, neighbourhood: int = 3, seed: int = 0
) -> GoodImagePrior:
    """A prior from the good images' stage activations (batches of B×C×h×w)."""
    locations = torch.cat([_flatten_locations(local_features(a, neighbourhood)) for a in activations])
    if locations.shape[0] > MAX_CANDIDATES:
        keep = torch.randperm(locations.shape[0], generator=torch.Generator().manual_seed(seed))[:MAX_CANDIDATES]
        locations = locations[keep]
    chosen = greedy_coreset(locations, bank_size, seed)
    return GoodImagePrior(stage, locations[chosen].contiguous(), neighbourhood)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, neighbours: int = 1) -> torch.Tensor:
    """N×C queries -> each one's mean distance to its `neighbours` nearest bank vectors.

    Neighbours are found by matrix products (fast), and their distances then computed from the differences:
    the product form loses all precision for a query that nearly matches the bank (the square root of a
    small difference of large numbers)."""
    k = max(1, min(neighbours, bank.shape[0]))
    nearest = []
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        found = torch.cdist(chunk, bank).topk(k, dim=1, largest=False).indices  # chunk×k
        nearest.append((chunk[:, None, :] - bank[found]).norm(dim=2).mean(dim=1))
    return torch.cat(nearest) if nearest else queries.new_zeros(0)


def distance_maps(prior: GoodImagePrior, activation: torch.Tensor, neighbours: int = 1) -> torch.Tensor:
    """B×h×w: each location's mean distance to its `neighbours` nearest good locations (`nearest_distances`),
    image by image, so no map depends on its batch (matrix products round differently for other sizes)."""
    features = local_features(activation, prior.neighbourhood)
    batch, _, height, width = features.shape
    bank = prior.bank.to(features.device)
    maps = [nearest_distances(image.flatten(1).T, bank, neighbours).view(height, width) for image in features]
    return torch.stack(maps) if maps else features.new_zeros((0, height, width))
