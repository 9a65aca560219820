"""A torchrun worker for tests/test_distributed.py: every rank shards rows as training does and gathers
them back; exits non-zero unless every rank gets every row, in order, in the original dtype, whatever
the chunk size of the exchange and however unevenly the rows split. Then the same for items of any shapes
and dtypes (`share_tensor_lists`), and for the bags of tiles each rank cuts from its share of the images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.distributed import Ranks, process_group
from defect_studio.ml.preprocess import Preprocessing
from defect_studio.ml.classifier import build_classifier
from defect_studio.ml.classifier_options import ClassifierConfig
from defect_studio.ml.tile_training import cut_into_bags, good_tile_novelty
from defect_studio.ml.tiling import Tiling


def item(index: int) -> list[torch.Tensor]:
    """Tensors of several dtypes whose shapes and values depend on the item."""
    return [torch.arange(index * 3, dtype=torch.float16).reshape(index, 3) / 7,
            torch.full((2, index + 1, 1), index, dtype=torch.uint8),
            torch.tensor([index * 1e6 + 0.5], dtype=torch.float32)]


with process_group("cpu") as (ranks, _):
    for count in (0, 1, 5, 6, 7, 100):
        full = torch.arange(count * 6, dtype=torch.float16).reshape(count, 2, 3)
        local = full[ranks.shard(count)]
        for chunk_bytes in (24, 64, 2**30):  # one row per exchange, a few rows, all at once
            gathered = ranks.gather_rows(local, count, chunk_bytes=chunk_bytes)
            assert gathered.dtype == torch.float16 and torch.equal(gathered, full), (count, chunk_bytes)
    for count in (0, 1, 5):
        owned = {index: item(index) for index in ranks.shard(count)}
        # rank 0 already holds item 2 (as a rank reuses features from an earlier round): it does not ask for it
        wanted = [index for index in range(count) if index not in owned and not (ranks.rank == 0 and index == 2)]
        received = ranks.share_tensor_lists(owned, wanted, count)
        assert sorted(received) == wanted, (count, sorted(received), wanted)
        for index, tensors in received.items():
            for got, expected in zip(tensors, item(index), strict=True):
                assert got.dtype == expected.dtype and torch.equal(got, expected), (index, got, expected)

    folder = Path("bag-images")
    paths = [folder / f"{index}.png" for index in range(5)]
    if ranks.is_writer:
        folder.mkdir()
        rng = np.random.default_rng(0)
        for index, path in enumerate(paths):  # different sizes: 1 to 12 tiles each, one image not cut
            cv2.imwrite(str(path), rng.integers(0, 255, (40 + 30 * index, 40 + 20 * index), dtype=np.uint8))
    torch.distributed.barrier()
    preprocessing, tiling = Preprocessing(32, 1), Tiling("tiles", 48, 8)
    alone, alone_tiled = run_job(cut_into_bags(paths, preprocessing, tiling, CancelToken(), torch.device("cpu"),
                                               Ranks.single()))
    shared, shared_tiled = run_job(cut_into_bags(paths, preprocessing, tiling, CancelToken(), torch.device("cpu"), ranks))
    assert shared_tiled == alone_tiled == 4
    assert (shared.starts == alone.starts).all()
    for name in ("pixels", "offsets", "steps"):
        assert torch.equal(getattr(shared, name), getattr(alone, name)), name
    # the good tiles' novelty: each rank scores its share against the same bank, as one process scores all
    config = ClassifierConfig(arch="compact", width=8, input_size=32, seed=0)
    torch.manual_seed(0)
    model = build_classifier(config)
    labels = np.array([0, 1, 0, 1, 0])
    alone_novelty = good_tile_novelty(model, alone, labels, torch.device("cpu"), config, CancelToken(), batch_size=4)
    shared_novelty = good_tile_novelty(model, shared, labels, torch.device("cpu"), config, CancelToken(), batch_size=4,
                                       ranks=ranks)
    assert shared_novelty.shape == alone_novelty.shape == (len(alone),)
    assert np.allclose(shared_novelty, alone_novelty, rtol=1e-5, atol=1e-6), np.abs(shared_novelty - alone_novelty).max()
    print(f"rank {ranks.rank}: gathered in order")
