"""Data-parallel calibration under ``torchrun``: shard blocks, add up results.

Each rank measures its own share of the token blocks (``blocks[rank::world]``)
into its own accumulators; one all-reduce of all sums and one of all token
counts make every rank hold the totals. Sums are additive, so the result
equals a single-process run up to float32 summation order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""
    return Ranks(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device: str) -> tuple[Ranks, str]:
    """Join the process group when launched by torchrun; return ranks and the
    device this rank computes on (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    ranks = ranks_from_env()
    if ranks.world_size > 1:
        import torch.distributed as dist

        if device == "cuda":
            device = f"cuda:{ranks.local_rank}"
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend)
            LOG.info(
                "calibration rank %d of %d on %s (%s)",
                ranks.rank,
                ranks.world_size,
                device,
                backend,
            )
    return ranks, device


def shard(blocks: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    return blocks[ranks.rank :: ranks.world_size] if ranks.world_size > 1 else blocks


def all_reduce(
    sums: list[torch.Tensor | None], rows: list[int], channels: list[int]
) -> tuple[list[torch.Tensor | None], list[int]]:
    """Sum accumulators and row counts over ranks (no-op without a group).

    A rank that never saw a module (possible for MoE experts) contributes
    zeros; the concatenation keeps it to one collective per quantity.
    """
    import torch.distributed as dist

    if (
        not (dist.is_available() and dist.is_initialized())
        or dist.get_world_size() == 1
    ):
        return sums, rows
    device = _collective_device()
    flat = torch.cat(
        [
            (s.to(device) if s is not None else torch.zeros(c, device=device))
            for s, c in zip(sums, channels)
        ]
    )
    counts = torch.tensor(rows, dtype=torch.int64, device=device)
    dist.all_reduce(flat)
    dist.all_reduce(counts)
    pieces = list(flat.split(channels))
    totals = counts.tolist()
    return [p if n > 0 else None for p, n in zip(pieces, totals)], totals


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
