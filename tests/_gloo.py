"""The process group of the multi-process CPU tests: gloo, initialised through a file, with a
timeout so that a stuck exchange fails the test instead of hanging it."""

import datetime

import torch.distributed as dist


def init_gloo(rank: int, world: int, init_file: str, timeout_s: int = 120) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
