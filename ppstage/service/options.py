"""What rank 0 needs to serve besides the parity-checked config (no aiohttp import here)."""

from __future__ import annotations

import msgspec


class ServiceOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Rank 0's service settings that are not part of the config.

    ``token`` is the bearer token mutating calls must carry (None: none
    required, which ``ppstage serve`` allows only on a loopback bind).
    ``warnings`` are shown in the status, the logs and the metrics for the life
    of the process (e.g. an R0 stream started with ``--force-unvalidated``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    unvalidated: bool = False
    warnings: tuple[str, ...] = ()
