"""Run ``prepare_data`` as one rank (RANK comes from the environment); used by test_prepare.py.

Usage: ``python prepare_rank_main.py DATASET DATA_DIR STARTED_FILE``. Writes ``STARTED_FILE`` just
before preparing, then one JSON line with the result on stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ftpipe.config import PipelineConfig
from ftpipe.data.prepare import prepare_data
from ftpipe.utils.logging import setup_logging


def main() -> None:
    dataset, data_dir, started = sys.argv[1:4]
    setup_logging()
    cfg = PipelineConfig.from_flat({"dataset": dataset, "data_dir": data_dir, "prepare_timeout_s": 60.0})
    Path(started).write_text(str(os.getpid()))
    result = prepare_data(cfg)
    sys.stdout.write(
        json.dumps({"folder": str(result.folder), "reused": result.reused, "pid": os.getpid()}) + "\n"
    )


if __name__ == "__main__":
    main()


def gloo_worker(
    rank: int,
    world_size: int,
    port: int,
    dataset: str,
    data_dir: str,
    out_dir: str,
    group_timeout_s: float = 1800.0,
    rank0_delay_s: float = 0.0,
) -> None:
    """One rank of a real gloo process group (collective timeout ``group_timeout_s``): prepare a good and a
    broken configuration; rank 0 starts ``rank0_delay_s`` late, as if preparing took that much longer."""
    import datetime
    import time

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=group_timeout_s)
    )
    try:
        cfg = PipelineConfig.from_flat({"dataset": dataset, "data_dir": data_dir, "prepare_timeout_s": 60.0})
        if rank == 0:
            time.sleep(rank0_delay_s)
        result = prepare_data(cfg)
        report: dict = {"folder": str(result.folder), "reused": result.reused, "pid": os.getpid()}
        broken = cfg.replace(field_mapping={"instruction": "question", "input": "input", "output": "output"})
        try:
            prepare_data(broken)
        except Exception as err:
            report["broken"] = f"{type(err).__name__}: {err}"
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()
