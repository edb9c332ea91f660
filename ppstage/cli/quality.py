"""``ppstage quality``: judge a recompute mode against a baseline on decoded frames."""

from __future__ import annotations

import argparse

from ppstage.cli.args import cut_chunk, non_negative_float, positive_int, prompt_at, text

HELP = (
    "compare decoded frames of two recompute modes, or (--rebase) a re-basing stream against an "
    "oracle that never re-bases (PSNR, max abs diff); PASS/FAIL report"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", choices=("r1", "r0a", "r0"), default="r0a")
    p.add_argument("--candidate", choices=("r1", "r0a", "r0"), default="r0")
    p.add_argument("--chunks", type=positive_int, default=12)
    p.add_argument("--threshold", type=non_negative_float, default=None, metavar="DB",
                   help="minimum per-chunk PSNR to PASS (default 35 dB)")
    p.add_argument("--out", default="out/quality.json", help="report JSON path")
    p.add_argument("--prompt", type=text, default=None)
    p.add_argument("--cut-at", type=cut_chunk, action="append", default=[], metavar="K")
    p.add_argument("--prompt-at", type=prompt_at, action="append", default=[], metavar="K:TEXT")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--rebase", action="store_true",
                   help="judge re-bases: the config's stream (its rope_max_frames) against the same "
                        "stream with a table large enough never to re-base")
    p.add_argument("--table", type=positive_int, default=None, metavar="FRAMES",
                   help="with --rebase: the candidate's model.rope_max_frames (default: the config's)")


def run(args: argparse.Namespace) -> int:
    """Exit status 0 on PASS, 1 on FAIL (a gate a script can use)."""
    from pathlib import Path

    from ppstage.config import PPStageConfig
    from ppstage.cli.output import console, is_terminal, table
    from ppstage.cli.reference import script_from_args

    cfg = PPStageConfig.from_toml(args.config) if args.config else PPStageConfig()  # before torch: fast errors
    import torch

    from ppstage.model.quality import (
        DEFAULT_THRESHOLD_DB,
        format_table,
        run_quality,
        run_rebase_quality,
        write_report,
    )

    torch.set_num_threads(args.threads)
    threshold = DEFAULT_THRESHOLD_DB if args.threshold is None else args.threshold
    if args.rebase:
        if args.table is not None:
            cfg = cfg.with_overrides({"model.rope_max_frames": args.table})
        report = run_rebase_quality(
            cfg, chunks=args.chunks, script=script_from_args(args), threshold_db=threshold
        )
    else:
        report = run_quality(
            cfg,
            baseline=args.baseline,
            candidate=args.candidate,
            chunks=args.chunks,
            script=script_from_args(args),
            threshold_db=threshold,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, report)
    if is_terminal():
        rows = [(r.chunk_index, r.cache_epoch, "inf" if r.psnr_db is None else f"{r.psnr_db:.2f}",
                 r.max_abs_diff, f"{r.mean_abs_diff:.4f}") for r in report.rows]
        cols = ("chunk", "epoch", "psnr_db", "max_abs", "mean_abs")
        verdict = format_table(report).splitlines()[-1]
        console().print(table(f"quality: {report.candidate} vs {report.baseline}", cols, rows, right=cols))
        console().print(f"[bold {'green' if report.passed else 'red'}]{verdict}[/]")
    else:
        print(format_table(report))
    print(f"config digest {report.config_digest}; wrote {out}")
    return 0 if report.passed else 1
