"""Fault drills as config: deliberate faults for the break-it suite (SPEC section 11).

A drill is a ``[[faults.drill]]`` entry of the one parity-checked config::

    [[faults.drill]]
    kind = "stall_decode"   # one of DrillKind
    rank = 0                # the rank that misbehaves
    chunk = 4               # the chunk_index at which it fires (once)
    ms = 0                  # duration, for kinds that take one (0 = "forever")

Because drills live in the config, they are part of the start-up parity digest:
a drill can never be active on one rank by accident (every rank must carry the
same list, and each entry names the one rank that acts on it). Production
configs carry none; the hooks cost one dict lookup per chunk.

| kind | who | what | SPEC |
|---|---|---|---|
| ``delay_result`` | last stage leader | sleeps ``ms`` before sending the chunk's result | B8 |
| ``extra_generator_call`` | stage leader | runs one denoise call more than planned | B2 |
| ``skip_generator_call`` | stage leader | skips the call of step 1 (reuses step 0's output) | B2 |
| ``perturb_start_frame`` | rank 0 | sends ``current_start_frame + 1`` (its own plan unchanged) | B7 |
| ``reset_cache_one_rank`` | generator rank | after the chunk, zeroes its KV cache telling no one | B6 |
| ``wrong_group_collective`` | stage leader | issues a collective on another stage's mesh group | B10 |
| ``corrupt_envelope`` | rank 0 | changes ``latents_in`` after its digest was taken | B5 |
| ``unknown_version_envelope`` | rank 0 | sends the envelope with header version 99 | B5 |
| ``drop_context_override`` | rank 0 | drops ``context_frames_override`` after validation (R0a/R0 recompute chunk) | B3 |
| ``wrong_type_field`` | rank 0 | puts a float in ``current_start_frame`` | B18 |
| ``payload_length_lie`` | rank 0 | hands ``latents_in`` one frame shorter than its spec | B19 |
| ``exit_rank`` | any rank | ``os._exit(1)`` at the chunk | B11 |
| ``stall_generator_call`` | stage leader | the worker hangs ``ms`` (0: an hour) in the final call | B15 |
| ``stall_decode`` | rank 0 | the decode of the chunk hangs ``ms`` (0: an hour) | B15/B16 |
| ``no_keepalives`` | rank 0 | sends no NOOPs at all (``chunk`` unused) | B12's control |

``PPSTAGE_FAULT`` (the environment variable of earlier builds) is gone: a
per-process variable is exactly the "active on one rank by accident" hazard.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from ppstage.config import DRILL_SITE, FOREVER_S, Drill, DrillKind, FaultsConfig, check_sites

_log = structlog.get_logger("ppstage.faults")

__all__ = ["DRILL_SITE", "FOREVER_S", "Drill", "DrillKind", "FaultsConfig", "RankDrills", "check_sites",
           "out_of_band_reset", "stall"]

class RankDrills:
    """The drills one rank acts on, looked up by ``(kind, chunk)``."""

    def __init__(self, faults: FaultsConfig, rank: int) -> None:
        self.rank = rank
        self._by_key = {(d.kind, d.chunk): d for d in faults.drill if d.rank == rank}
        self._kinds = {d.kind for d in faults.drill if d.rank == rank}

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def fires(self, kind: str, chunk_index: int) -> Drill | None:
        """The drill of ``kind`` at ``chunk_index`` for this rank, if any."""
        if not self._by_key:
            return None
        drill = self._by_key.get((kind, chunk_index))
        if drill is not None:
            # t_wall (seconds since the epoch) lets tests measure injection -> every rank exited.
            _log.warning("drill fired", kind=kind, rank=self.rank, chunk_index=chunk_index, t_wall=time.time())
        return drill

    def has(self, kind: str) -> bool:
        """Whether this rank carries a drill of ``kind`` at any chunk."""
        return kind in self._kinds


def stall(drill: Drill) -> None:
    """Block the calling thread for the drill's duration (a stuck kernel or decode)."""
    time.sleep(drill.seconds)


def out_of_band_reset(model) -> None:
    """B6: a stray cache reset on one rank, outside the protocol.

    The KV buffers are zeroed and the lifecycle's pointers go back to 0, as a
    rank that wrongly applied a reset would have them; no other rank knows.
    The state digests (mesh comparison, rank 0's shadow lifecycle) must catch it.
    """
    for cache in model.caches:
        cache.reset_kv()
    lc = model.lifecycle
    lc._state = msgspec.structs.replace(lc.state, local_end_index=0, global_end_index=0)
