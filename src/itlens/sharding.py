"""Inference sharded across processes (``accelerate launch``), merged into the one-process output.

``itlens shift`` and ``itlens generate`` run unchanged under ``accelerate launch --num_processes N``.
Every process plans the same batches as one process would, takes every N-th batch (round-robin, so
long and short batches spread evenly), runs only those, and sends its rows to the main process, which
puts them back in input order and writes the output. Because each record meets the same batch-mates
and padding as in a one-process run, the merged result is the same, not merely close.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Shard:
    """This process's place among the launched ones, and the device it should compute on."""

    rank: int
    world: int
    device: str
    state: Any = None  # accelerate.PartialState

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def spec(self) -> tuple[int, int]:
        return self.rank, self.world


def current_shard() -> Shard | None:
    """The launched process's shard, or None in a plain one-process run (nothing is initialised then).

    Under torchrun/accelerate (``WORLD_SIZE`` > 1) this sets up accelerate's process group: NCCL on
    GPUs (one device per local rank), gloo on CPUs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Shard(rank=state.process_index, world=state.num_processes, device=str(state.device), state=state)


def gather_to_main(shard: Shard, obj: Any) -> list[Any] | None:
    """Every process's ``obj`` (pickled), by rank, on the main process; None elsewhere."""
    import torch.distributed as dist

    parts: list[Any] | None = [None] * shard.world if shard.is_main else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def merge_records(parts: list[list[dict]], order: list[str]) -> list[dict]:
    """Records from every shard, in the input order given by ``order`` (unique ids)."""
    by_id = {r["id"]: r for part in parts for r in part}
    missing = [i for i in order if i not in by_id]
    if missing or len(by_id) != len(order) or sum(map(len, parts)) != len(order):
        raise RuntimeError(f"sharded run lost or duplicated records (missing {missing[:3]}, "
                           f"{len(by_id)} merged for {len(order)} inputs)")
    return [by_id[i] for i in order]


def report(what: str, counts: list[int]) -> None:
    """One stderr line saying how the work was split (e.g. ``sharded over 2 processes: 4 + 3 prompts``)."""
    import sys

    print(f"itlens: sharded over {len(counts)} processes: {' + '.join(map(str, counts))} {what}", file=sys.stderr)


def barrier(shard: Shard | None) -> None:
    if shard is not None:
        shard.state.wait_for_everyone()
