"""Shared by the distributed tests: a function run on two gloo processes on this machine."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def on_every_rank(work: Callable[[int, str], Any]) -> list[Any]:
    """``work(rank, shared)`` in each of ``WORLD`` processes of one gloo group (``shared``: a
    directory all of them see); what each returned, in rank order (saved with ``torch.save``
    and read back with ``weights_only=True``). ``work`` must be a module-level function (it is
    pickled by reference)."""
    with tempfile.TemporaryDirectory() as results:
        mp.spawn(_run, args=(work, results), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(results, f"rank{rank}.pt"), weights_only=True)
                for rank in range(WORLD)]


def _run(rank: int, work: Callable[[int, str], Any], results: str) -> None:
    # a collective that one rank misses fails after a minute instead of hanging the run
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(results, 'init')}",
                            rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.save(work(rank, results), os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
