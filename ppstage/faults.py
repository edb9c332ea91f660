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
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

ENV_VAR = "PPSTAGE_FAULT"


class Fault(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["extra_generator_call", "tamper_envelope", "perturb_start_frame", "stall_generator_call"]
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
