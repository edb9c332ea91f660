"""Quality validation: compare decoded frames of two recompute modes chunk by chunk.

SPEC section 4: R0 (latent anchor) is a semantic change and must not be
enabled unless a validation against R0a passed *for the same model and
config*. ``run_quality`` produces that evidence (PSNR and max abs difference
of the decoded uint8 frames per chunk, a PASS/FAIL verdict against a PSNR
threshold) and ``check_quality_report`` is what a deployment enabling R0
calls to verify a stored report.
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
    neutral = config.with_overrides({"recompute.mode": "r0a", "recompute.r0_quality_report": None})
    parts = {name: getattr(neutral, name) for name in ("model", "cache", "recompute", "denoise")}
    return digest_bytes(msgspec.json.encode(parts, order="sorted"))


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
    finite = [r.psnr_db for r in rows if r.psnr_db is not None]
    min_psnr = min(finite) if finite else None
    ok = min_psnr is None or min_psnr >= threshold_db
    return QualityReport(
        baseline=baseline,
        candidate=candidate,
        chunks=chunks,
        threshold_db=threshold_db,
        min_psnr_db=min_psnr,
        max_abs_diff=max((r.max_abs_diff for r in rows), default=0),
        verdict="PASS" if ok else "FAIL",
        config_digest=quality_config_digest(config),
        baseline_config_digest=base_cfg.digest(),
        candidate_config_digest=cand_cfg.digest(),
        script=script,
        rows=rows,
    )


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
    return report


def format_table(report: QualityReport) -> str:
    lines = [f"{'chunk':>6} {'epoch':>6} {'psnr_db':>9} {'max_abs':>8} {'mean_abs':>9}"]
    for r in report.rows:
        psnr = "inf" if r.psnr_db is None else f"{r.psnr_db:.2f}"
        lines.append(
            f"{r.chunk_index:>6} {r.cache_epoch:>6} {psnr:>9} {r.max_abs_diff:>8} "
            f"{r.mean_abs_diff:>9.4f}"
        )
    worst = "inf" if report.min_psnr_db is None else f"{report.min_psnr_db:.2f}"
    lines.append(
        f"{report.candidate} vs {report.baseline}: min PSNR {worst} dB, max abs diff "
        f"{report.max_abs_diff}, threshold {report.threshold_db:.2f} dB -> {report.verdict}"
    )
    return "\n".join(lines)
