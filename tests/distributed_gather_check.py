"""A torchrun worker for tests/test_distributed.py: every rank shards rows as training does and gathers
them back; exits non-zero unless every rank gets every row, in order, in the original dtype, whatever
the chunk size of the exchange and however unevenly the rows split."""

from __future__ import annotations

import torch

from defect_studio.ml.distributed import process_group

with process_group("cpu") as (ranks, _):
    for count in (0, 1, 5, 6, 7, 100):
        full = torch.arange(count * 6, dtype=torch.float16).reshape(count, 2, 3)
        local = full[ranks.shard(count)]
        for chunk_bytes in (24, 64, 2**30):  # one row per exchange, a few rows, all at once
            gathered = ranks.gather_rows(local, count, chunk_bytes=chunk_bytes)
            assert gathered.dtype == torch.float16 and torch.equal(gathered, full), (count, chunk_bytes)
    print(f"rank {ranks.rank}: gathered in order")
