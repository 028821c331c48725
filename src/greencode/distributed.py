"""The process group of a run launched by ``torchrun`` or ``accelerate launch`` (shared by the
evaluation and the trajectory bank, which shard their samples by rank and merge on rank 0)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place in a multi-process run (evaluation, trajectory bank) launched by ``torchrun`` or
    ``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK); one process otherwise."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        here = False
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend)
            here = True
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, initialized_here=here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()

