"""Named fault injections for the break-it suite (SPEC section 11).

A fault is chosen per process with the environment variable ``PPSTAGE_FAULT``
(JSON, e.g. ``{"kind": "extra_generator_call", "chunk_index": 3}``) and fires
once, at that chunk, on the rank(s) whose environment carries it. Production
runs never set it; the hooks it drives cost one ``is None`` check per chunk.

| kind | where | SPEC |
|---|---|---|
| ``extra_generator_call`` | a stage leader runs one denoise call more than planned | B2 |
| ``tamper_envelope`` | rank 0 changes ``latents_in`` after its digest was taken | B5 |
| ``perturb_start_frame`` | rank 0 sends ``current_start_frame + 1`` (its own plan unchanged) | B7 |
| ``stall_generator_call`` | a stage leader's worker hangs in a generator call (a stuck kernel) | §7 |
| ``reset_cache_one_rank`` | after the chunk, one rank zeroes its KV cache and indices, telling no one | B6 |
| ``no_keepalives`` | rank 0 sends no NOOPs at all (``chunk_index`` unused) | B12's control |
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

ENV_VAR = "PPSTAGE_FAULT"


class Fault(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal[
        "extra_generator_call",
        "tamper_envelope",
        "perturb_start_frame",
        "stall_generator_call",
        "reset_cache_one_rank",
        "no_keepalives",
    ]
    chunk_index: int

    def fires(self, kind: str, chunk_index: int) -> bool:
        return self.kind == kind and self.chunk_index == chunk_index


def fault_from_env() -> Fault | None:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw, type=Fault)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a fault: {exc}") from exc


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
