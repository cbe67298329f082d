"""Leaving the process group together at the end of training."""

from __future__ import annotations

from ftpipe.utils.launch import remember_rank
from ftpipe.utils.world import in_group


def leave_process_group() -> None:
    """Every rank together: wait for the others, then destroy the default process group.

    Called by all ranks once training is over. A rank that exits (or goes on alone) while its peers
    still hold the group makes gloo abort the peers' processes, so nobody leaves before everybody
    is done; afterwards the process can exit, or rank 0 export and evaluate alone.
    """
    import torch.distributed as dist

    if not in_group():
        return
    # Rank-aware logging keeps working without the group (Lightning's launcher sets no RANK).
    remember_rank(dist.get_rank())
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
