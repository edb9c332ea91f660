"""Default process group start-up, with the config's start-up timeout."""

from __future__ import annotations

import os
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
    # Rendezvous and the first collective may wait for ranks on other nodes to
    # start: the start-up timeout, not the steady-state one (build_groups).
    timeout = timedelta(seconds=config.runtime.startup_timeout_s)
    if master_addr is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's c10d rendezvous shares ONE store server across restarts and the
        # workers connect to it without a per-attempt prefix: a restarted generation
        # would read the previous generation's peer addresses and fail to connect
        # ("Connection refused"). Keys of each generation get their own prefix.
        from ppstage.distributed.supervision import restart_generation

        base = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
            is_master=False, timeout=timeout,
        )
        store = dist.PrefixStore(f"ppstage/generation{restart_generation()}", base)
        dist.init_process_group(
            backend=config.topology.backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        return
    dist.init_process_group(
        backend=config.topology.backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
