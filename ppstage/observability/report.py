"""``ppstage demo``: run a local pipeline, then check it against the reference pipeline.

The check: every emitted chunk's output digest equals the single-process
reference pipeline's digest for the same ``chunk_index``; every chunk that
was not emitted was dropped by a hard cut (its epoch was superseded), never
lost for another reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass
class DigestCheck:
    compared: int
    matched: int
    mismatched: list[int]
    dropped_by_cut: list[int]
    missing: list[int]

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.missing and self.matched == self.compared


def check_digests(
    events: Sequence[dict[str, Any]],
    reference: Sequence[Any],
    *,
    latents: Callable[[int], Any] | None = None,
    atol: float = 0.0,
) -> DigestCheck:
    """Compare rank 0's per-chunk events with reference ``ChunkRecord``s.

    With ``atol == 0`` an emitted chunk matches when its output digest is the
    reference's (bitwise). With ``atol > 0`` (tensor parallel: partial sums are
    added in another order) it matches when ``latents(chunk_index)`` is within
    ``atol`` of the reference's ``latents_out`` everywhere.
    """
    ref = {r.chunk_index: r for r in reference}
    last_epoch = max((e["cache_epoch"] for e in events), default=0)
    matched, mismatched, dropped, missing = 0, [], [], []
    compared = 0
    for e in events:
        k = e["chunk_index"]
        if e["outcome"] == "emitted":
            compared += 1
            if k in ref and ref[k].cache_epoch == e["cache_epoch"] and _close(ref[k], e, latents, atol):
                matched += 1
            else:
                mismatched.append(k)
        elif e["outcome"] in ("stale_epoch", "flushed") and e["cache_epoch"] < last_epoch:
            dropped.append(k)
        else:
            missing.append(k)
    return DigestCheck(compared, matched, mismatched, dropped, missing)


def _close(record: Any, event: dict[str, Any], latents: Callable[[int], Any] | None, atol: float) -> bool:
    if atol == 0.0:
        return record.output_digest == event["output_digest"]
    got = latents(event["chunk_index"]) if latents is not None else None
    if got is None:
        return False
    diff = (got.reshape(record.latents_out.shape) - record.latents_out).abs().max()
    return float(diff) <= atol


def _ratio(s: dict[str, Any]) -> str:
    slower = max(s["median_s0_ms"], s["median_s1_ms"])
    both = s["median_s0_ms"] + s["median_s1_ms"]
    if slower <= 0 or s["median_period_ms"] is None:
        return "n/a"
    # 1.00x of the slower stage: perfect overlap; 1.00x of the sum: none at all.
    return (f"{s['median_period_ms'] / slower:.2f}x   (period / (stage 0 + generator): "
            f"{s['median_period_ms'] / both:.2f}x)")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _loop_cpu(s: dict[str, Any]) -> str:
    pct = s.get("loop_cpu_pct_of_period", 0.0)
    share = "no period" if pct is None else f"{pct:.1f} % of the period"
    return f"{s.get('loop_cpu_ms_per_chunk', 0.0):.2f} ms ({share})"


def format_summary(
    summary: dict[str, Any], check: DigestCheck | None, *, stages: int, tp: int, mode: str, tol: float = 0.0
) -> str:
    """The run summary as aligned plain lines (``summary_rows``)."""
    rows = summary_rows(summary, check, stages=stages, tp=tp, mode=mode, tol=tol)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def summary_rows(
    summary: dict[str, Any], check: DigestCheck | None, *, stages: int, tp: int, mode: str, tol: float = 0.0
) -> list[tuple[str, str]]:
    """``(name, value)`` rows of a run summary and its digest check (plain or rich)."""
    s = summary
    rows = [
        ("topology", f"rank 0 + {stages} stage(s) x tp {tp}, mode {mode}"),
        ("chunks emitted / planned", f"{s['chunks_emitted']} / {s['chunks_planned']}"),
        # A rate needs two emitted chunks (first to last); with fewer it is undefined, not 0.
        ("frames/s", f"{s['frames_per_s']:.1f}" if s["chunks_emitted"] > 1 and s["frames_per_s"] > 0 else "n/a"),
        ("median period", _ms(s["median_period_ms"])),
        ("median stage-0 time (build+decode)", _ms(s["median_s0_ms"] if s["chunks_emitted"] else None)),
        ("median generator time", _ms(s["median_s1_ms"] if s["chunks_emitted"] else None)),
        ("period / slower stage", _ratio(s)),
        ("per-stage median", ", ".join(f"s{i + 1} {v:.1f} ms" for i, v in enumerate(s["stage_median_ms"])) or "n/a"),
        ("queue maxima", f"in flight {s['max_in_flight']}, decode {s['max_decode_queue']}"),
        ("OverlapScore", f"{s['overlap_score']:.2f}" if s["chunks_emitted"] else "n/a"),
        ("rank-0 loop CPU per chunk", _loop_cpu(s)),
        ("dropped", ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "none"),
    ]
    if check is not None and not check.compared and check.ok:  # a stop before any chunk: nothing to check
        rows.append(("digests vs reference", "no chunk to check"))
    elif check is not None:
        verdict = ("ALL MATCH" if check.ok else "MISMATCH") + (f", |diff| <= {tol:g}" if tol else ", bitwise")
        rows.append(
            ("digests vs reference", f"{check.matched}/{check.compared} match ({verdict})"
             + (f"; mismatched {check.mismatched}" if check.mismatched else "")
             + (f"; lost {check.missing}" if check.missing else "")
             + (f"; dropped by hard cut {check.dropped_by_cut}" if check.dropped_by_cut else ""))
        )
    return rows
