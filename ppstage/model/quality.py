"""Quality validation: compare decoded frames of two recompute modes chunk by chunk.

SPEC section 4: R0 (latent anchor) is a semantic change and must not be
enabled unless a validation against R0a passed *for the same model and
config*. ``run_quality`` produces that evidence (PSNR and max abs difference
of the decoded uint8 frames per chunk, a PASS/FAIL verdict against a PSNR
threshold) and ``check_quality_report`` is what a deployment enabling R0
calls to verify a stored report.

SPEC section 13: ``run_rebase_quality`` compares a re-basing stream (the
config's small positional table) with an *oracle*, the same config with a
table large enough never to re-base, on the same inputs (same noise, prompts
and cuts: positions are the only difference). ``rebase_changes_view`` says
when a re-base changes what the model sees (a pinned sink's distance), and
``check_rebase_quality_report`` gates those configs like R0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import msgspec
import torch

from protocol import digest_bytes

from ppstage.config import ConfigError, PPStageConfig, RecomputeMode
from ppstage.model.reference import ChunkRecord, StreamScript, run_reference

DEFAULT_THRESHOLD_DB = 35.0
REPORT_VERSION = 1


class QualityError(ConfigError):
    """A quality report is missing, failed, or was made for another model/config."""


class ChunkQuality(msgspec.Struct, frozen=True, kw_only=True):
    chunk_index: int
    cache_epoch: int
    psnr_db: float | None  # None: the frames are identical (infinite PSNR)
    max_abs_diff: int
    mean_abs_diff: float


class QualityReport(msgspec.Struct, frozen=True, kw_only=True):
    version: int = REPORT_VERSION
    baseline: str
    candidate: str
    chunks: int
    threshold_db: float
    min_psnr_db: float | None  # None: every chunk identical
    max_abs_diff: int
    verdict: str  # "PASS" | "FAIL"
    config_digest: str  # quality_config_digest(config): model + config, mode-independent
    baseline_config_digest: str  # PPStageConfig.digest() of the baseline run
    candidate_config_digest: str  # PPStageConfig.digest() of the candidate run
    script: StreamScript
    rows: tuple[ChunkQuality, ...]
    rebase_chunks: tuple[int, ...] = ()  # chunks at whose boundary the candidate re-based
    oracle_table: int | None = None  # rope_max_frames of the oracle (re-base reports)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two uint8 images; ``inf`` when identical."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def quality_config_digest(config: PPStageConfig) -> str:
    """Digest of what decides the video: "the same model and config".

    Model, cache, recompute (bar the mode and the report path) and denoise
    settings. Topology and runtime are left out: they decide how the work is
    spread and timed, and the pipeline is bitwise equal to the reference for
    any split, so a report made once holds for every topology.
    """
    neutral = config.with_overrides(
        {"recompute.mode": "r0a", "recompute.r0_quality_report": None, "cache.rebase_quality_report": None}
    )
    parts = {name: getattr(neutral, name) for name in ("model", "cache", "recompute", "denoise")}
    return digest_bytes(msgspec.json.encode(parts, order="sorted"))


def around_rebases(report: QualityReport) -> list[tuple[int, str]]:
    """Per re-base chunk k: the worst PSNR of chunks k-1 .. k+2 (``"inf"`` when all identical)."""
    by_chunk = {r.chunk_index: r.psnr_db for r in report.rows}
    out = []
    for k in report.rebase_chunks:
        near = [by_chunk[j] for j in range(k - 1, k + 3) if j in by_chunk]
        finite = [p for p in near if p is not None]
        out.append((k, f"{min(finite):.2f} dB" if finite else "inf"))
    return out


def compare_records(
    baseline: Sequence[ChunkRecord], candidate: Sequence[ChunkRecord]
) -> tuple[ChunkQuality, ...]:
    if len(baseline) != len(candidate):
        raise ValueError(f"{len(baseline)} baseline chunks vs {len(candidate)} candidate chunks")
    rows = []
    for b, c in zip(baseline, candidate):
        if (b.chunk_index, b.cache_epoch, b.current_start_frame) != (
            c.chunk_index, c.cache_epoch, c.current_start_frame,
        ):
            raise ValueError(f"chunk {b.chunk_index}: the two runs planned different streams")
        diff = (b.pixels.int() - c.pixels.int()).abs()
        p = psnr_db(b.pixels, c.pixels)
        rows.append(
            ChunkQuality(
                chunk_index=b.chunk_index,
                cache_epoch=b.cache_epoch,
                psnr_db=None if math.isinf(p) else round(p, 3),
                max_abs_diff=int(diff.max()),
                mean_abs_diff=round(float(diff.float().mean()), 4),
            )
        )
    return tuple(rows)


def run_quality(
    config: PPStageConfig,
    *,
    baseline: RecomputeMode = "r0a",
    candidate: RecomputeMode = "r0",
    chunks: int = 12,
    script: StreamScript | None = None,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
) -> QualityReport:
    """Run the reference twice (same stream, two modes) and judge the candidate."""
    script = script if script is not None else StreamScript()
    base_cfg = config.with_overrides({"recompute.mode": baseline})
    cand_cfg = config.with_overrides({"recompute.mode": candidate})
    rows = compare_records(
        run_reference(base_cfg, chunks, script), run_reference(cand_cfg, chunks, script)
    )
    return _judge(
        rows, threshold_db, baseline=baseline, candidate=candidate, chunks=chunks,
        config_digest=quality_config_digest(config), baseline_config_digest=base_cfg.digest(),
        candidate_config_digest=cand_cfg.digest(), script=script,
    )


def _judge(rows: list[ChunkQuality], threshold_db: float, **fields) -> QualityReport:
    """The report of ``rows``: the worst PSNR against the threshold decides PASS/FAIL.

    Chunks with identical frames have no PSNR (infinite) and never fail the gate.
    """
    finite = [r.psnr_db for r in rows if r.psnr_db is not None]
    min_psnr = min(finite) if finite else None
    ok = min_psnr is None or min_psnr >= threshold_db
    return QualityReport(
        threshold_db=threshold_db,
        min_psnr_db=min_psnr,
        max_abs_diff=max((r.max_abs_diff for r in rows), default=0),
        verdict="PASS" if ok else "FAIL",
        rows=rows,
        **fields,
    )


REBASE_BASELINE, REBASE_CANDIDATE = "oracle", "rebase"


def rebase_changes_view(config: PPStageConfig) -> bool:
    """Whether a re-base under ``config`` can change what the model attends to.

    A re-base moves every cached frame by the same amount, except sinks kept by
    a roll, which are pinned (docs/lifecycle.md). So it changes the view only
    when it can land on a rolled chunk that has sinks: mode ``r1``, or a
    recompute cadence above 1. With cadence 1 every re-base lands on a rebuild,
    which writes every frame at its new position: relative distances are exact.
    """
    c = config.cache
    return c.sink_frames > 0 and (config.recompute.mode == "r1" or config.recompute.cadence > 1)


def rebase_config_digest(config: PPStageConfig) -> str:
    """Digest of what decides a re-basing stream's video: model, cache, mode, cadence, denoise."""
    neutral = config.with_overrides(
        {"recompute.r0_quality_report": None, "cache.rebase_quality_report": None}
    )
    parts = {name: getattr(neutral, name) for name in ("model", "cache", "recompute", "denoise")}
    return digest_bytes(msgspec.json.encode(parts, order="sorted"))


def oracle_table(config: PPStageConfig, chunks: int) -> int:
    """A positional table that ``chunks`` chunks of one epoch never pass."""
    return max(config.model.rope_max_frames, (chunks + 1) * config.cache.chunk_frames)


def run_rebase_quality(
    config: PPStageConfig,
    *,
    chunks: int = 24,
    script: StreamScript | None = None,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
) -> QualityReport:
    """Compare ``config`` (re-basing at its table) with an oracle that never re-bases."""
    script = script if script is not None else StreamScript()
    cand_cfg = config.with_overrides({"cache.on_position_overflow": "rebase"})
    table = oracle_table(config, chunks)
    base_cfg = cand_cfg.with_overrides({"model.rope_max_frames": table})
    candidate = run_reference(cand_cfg, chunks, script)
    rows = compare_records(run_reference(base_cfg, chunks, script), candidate)
    return _judge(
        rows, threshold_db, baseline=REBASE_BASELINE, candidate=REBASE_CANDIDATE, chunks=chunks,
        config_digest=rebase_config_digest(config), baseline_config_digest=base_cfg.digest(),
        candidate_config_digest=cand_cfg.digest(), script=script,
        rebase_chunks=tuple(r.chunk_index for r in candidate if r.rebased), oracle_table=table,
    )


def check_rebase_quality_report(
    config: PPStageConfig, path: str | Path | None = None, *, chunks: int | None = None
) -> QualityReport | None:
    """The re-base gate: where a re-base changes the view, refuse without a PASS for this config.

    Returns None when no report is needed: policy ``cut``; re-bases that keep
    every relative distance; or a run of ``chunks`` chunks too short to reach
    the table (``None``: unbounded). Mode ``r1`` is the bring-up mode that
    already departs from the reference model (SPEC section 4): measured, not gated.
    """
    short = chunks is not None and chunks * config.cache.chunk_frames <= config.model.rope_max_frames
    if (
        config.cache.on_position_overflow != "rebase"
        or config.recompute.mode == "r1"
        or not rebase_changes_view(config)
        or short
    ):
        return None
    path = path if path is not None else config.cache.rebase_quality_report
    if path is None:
        raise QualityError(
            "re-bases under this config pin the sinks (cadence > 1), which changes what the model "
            "sees: set cache.rebase_quality_report to a passing `ppstage quality --rebase` report, "
            'or cache.on_position_overflow = "cut"'
        )
    report = read_report(path)
    if (report.baseline, report.candidate) != (REBASE_BASELINE, REBASE_CANDIDATE):
        raise QualityError(f"report compares {report.candidate} to {report.baseline}, not a re-base to its oracle")
    if report.config_digest != rebase_config_digest(config):
        raise QualityError("re-base quality report was made for a different model or config")
    if not report.rebase_chunks:
        raise QualityError("re-base quality report contains no re-base (run more chunks)")
    if not report.passed:
        raise QualityError(f"re-base quality report verdict is {report.verdict} (min PSNR {report.min_psnr_db} dB)")
    return report


def write_report(path: str | Path, report: QualityReport) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))


def read_report(path: str | Path) -> QualityReport:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=QualityReport)
    except (OSError, msgspec.DecodeError) as exc:
        raise QualityError(f"cannot read quality report {path}: {exc}") from exc


def check_quality_report(config: PPStageConfig, path: str | Path | None = None) -> QualityReport:
    """Refuse unless ``path`` (default: ``recompute.r0_quality_report``) holds a PASS of
    ``r0`` against ``r0a`` for this very model and config."""
    path = path if path is not None else config.recompute.r0_quality_report
    if path is None:
        raise QualityError("mode r0 needs recompute.r0_quality_report (run `ppstage quality`)")
    report = read_report(path)
    if (report.baseline, report.candidate) != ("r0a", "r0"):
        raise QualityError(f"report compares {report.candidate} to {report.baseline}, not r0 to r0a")
    if report.config_digest != quality_config_digest(config):
        raise QualityError("quality report was made for a different model or config")
    if not report.passed:
        raise QualityError(
            f"quality report verdict is {report.verdict} (min PSNR {report.min_psnr_db} dB)"
        )
    first = first_decoded_anchor_chunk(config)
    if report.chunks <= first:
        # Before it, R0 and R0a build the same (early-regime) context: the report compared nothing.
        raise QualityError(
            f"quality report covers {report.chunks} chunk(s); R0 first differs from R0a at chunk {first} "
            f"(the first decoded anchor): run `ppstage quality` with --chunks {first + 4} or more"
        )
    return report


def first_decoded_anchor_chunk(config: PPStageConfig, limit: int = 10_000) -> int:
    """The first chunk whose R0a recompute context is anchored on a decoded frame (SPEC §4).

    Until then both modes build the context from latents alone, so a report that
    ends before it cannot tell R0 from R0a.
    """
    from ppstage.core.planner import Planner, StreamStart

    planner = Planner(config.with_overrides({"recompute.mode": "r0a"}))
    planner.submit(StreamStart("quality gate"))
    for _ in range(limit):
        plan = planner.next_chunk()
        if plan.context_source == "decoded":
            return plan.chunk_index
    return limit


def format_table(report: QualityReport) -> str:
    lines = [f"{'chunk':>6} {'epoch':>6} {'psnr_db':>9} {'max_abs':>8} {'mean_abs':>9}"]
    rebased = set(report.rebase_chunks)
    for r in report.rows:
        psnr = "inf" if r.psnr_db is None else f"{r.psnr_db:.2f}"
        lines.append(
            f"{r.chunk_index:>6} {r.cache_epoch:>6} {psnr:>9} {r.max_abs_diff:>8} "
            f"{r.mean_abs_diff:>9.4f}" + ("  re-base" if r.chunk_index in rebased else "")
        )
    if report.rebase_chunks:
        lines.append(
            f"{len(report.rebase_chunks)} re-base(s) at chunks {list(report.rebase_chunks)}; "
            f"oracle table {report.oracle_table} frames"
        )
        for k, lo in around_rebases(report):
            lines.append(f"  re-base at chunk {k}: min PSNR over chunks {k - 1}..{k + 2}: {lo}")
    worst = "inf" if report.min_psnr_db is None else f"{report.min_psnr_db:.2f}"
    lines.append(
        f"{report.candidate} vs {report.baseline}: min PSNR {worst} dB, max abs diff "
        f"{report.max_abs_diff}, threshold {report.threshold_db:.2f} dB -> {report.verdict}"
    )
    return "\n".join(lines)
