"""Default process group start-up, with the config's start-up timeout."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from ppstage.config import PPStageConfig


def init_process_group(
    config: PPStageConfig,
    rank: int,
    world_size: int,
    master_addr: str | None = "127.0.0.1",
    master_port: int = 29500,
) -> None:
    """Initialise the default process group for this rank.

    Uses ``config.topology.backend`` and ``config.runtime.startup_timeout_s``
    (minutes: the rendezvous and the world group's only collective, the parity
    handshake, wait for ranks that start late on other nodes), and the TCP
    store at ``master_addr:master_port`` (rank 0 hosts it). Every group used
    after start-up is created by ``build_groups`` with the short steady-state
    ``runtime.pg_timeout_s``, as torchtitan shortens its timeouts after the
    first step (``set_pg_timeouts``); the world group is not used again. With
    ``master_addr=None`` it reads ``MASTER_ADDR``/``MASTER_PORT`` from the
    environment (``env://``, as set by torchrun).

    It does not check ``world_size`` against the config: a rank whose config
    disagrees must still reach the parity handshake, which names the
    difference on every rank instead of leaving the others waiting. On NCCL,
    call ``torch.cuda.set_device`` for this rank before.
    """
    if master_addr is None:
        init_method = "env://"
    else:
        host = f"[{master_addr}]" if ":" in master_addr and not master_addr.startswith("[") else master_addr
        init_method = f"tcp://{host}:{int(master_port)}"
    dist.init_process_group(
        backend=config.topology.backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=config.runtime.startup_timeout_s),
    )
