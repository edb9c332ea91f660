"""A bench's target: the claim a run's figures are checked against, and whether this run met it.

Each bench's result lists its ``Target`` s; the report prints them and
``ppstage bench --strict`` reads ``met`` from the same objects, so the
printed verdict and the exit status cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec


class Target(msgspec.Struct, frozen=True, kw_only=True):
    claim: str  # what was checked, with this run's figure ("target: K=2 <= 1.25x K=1: 1.31x")
    met: bool
    note: str = ""  # printed after the verdict (a baseline for comparison)

    def line(self) -> str:
        return f"{self.claim}  {'PASS' if self.met else 'FAIL'}{self.note}"


def all_met(targets: Iterable[Target]) -> bool:
    """True when no target was missed (a bench that checked none has missed none)."""
    return all(t.met for t in targets)
