"""``ppstage reference``: run the single-process reference and write its digests and frames."""

from __future__ import annotations

import argparse

from ppstage.cli.plan import script_from_args  # re-exported for ppstage.cli.quality

from ppstage.cli.args import config_from_args, cut_chunk, positive_int, prompt_at, text

HELP = "run the single-process reference model (R1/R0a/R0); write digests JSON and a contact sheet"
CONFIG_FLAGS = {"mode": "recompute.mode"}  # given flags override the config's key


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=positive_int, default=8)
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default=None, help="default: the config's")
    p.add_argument("--prompt", type=text, default=None, help="stream prompt (default: the reference's)")
    p.add_argument("--cut-at", type=cut_chunk, action="append", default=[], metavar="K")
    p.add_argument("--prompt-at", type=prompt_at, action="append", default=[], metavar="K:TEXT")
    p.add_argument("--out", default="out/reference", help="output directory")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (timings: 1)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ppstage.cli.output import console, is_terminal, table

    cfg = config_from_args(args, CONFIG_FLAGS)  # before torch: fast errors
    import torch

    from ppstage.distributed.devices import reference_device
    from ppstage.model.reference import contact_sheet, median_model_ms, run_reference, write_png

    torch.set_num_threads(args.threads)
    # On the device the config's generator ranks use, so the digests match theirs bitwise.
    records = run_reference(cfg, args.chunks, script_from_args(args), device=reference_device(cfg))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    median = median_model_ms(records)
    doc = {
        "mode": cfg.recompute.mode,
        "config_digest": cfg.digest(),
        "threads": args.threads,
        "median_model_ms": round(median, 3),
        "chunks": [{**r.summary(), "model_ms": round(r.model_ms, 3)} for r in records],
    }
    (out / "digests.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_png(out / "contact_sheet.png", contact_sheet(records))

    cols = ("chunk", "epoch", "start", "recomp", "source", "calls",
            "output_digest", "state_digest", "ms")
    rows = [
        (r.chunk_index, r.cache_epoch, r.current_start_frame, int(r.do_kv_recompute), r.context_source,
         r.generator_calls, r.output_digest[:14], r.state_digest[:14], f"{r.model_ms:.2f}")
        for r in records
    ]
    footer = (f"model time per chunk: median {median:.2f} ms over {len(records)} chunks "
              f"({args.threads} thread{'s' if args.threads != 1 else ''}, mode {cfg.recompute.mode})\n"
              f"wrote {out / 'digests.json'} and {out / 'contact_sheet.png'}")
    if is_terminal():
        console().print(table(f"reference: mode {cfg.recompute.mode}, backend {cfg.model.backend}", cols, rows,
                              right=("chunk", "epoch", "start", "recomp", "calls", "ms")))
        console().print(footer)
        return 0
    print(" ".join(f"{c:>14}" if "digest" in c else f"{c:>7}" for c in cols))
    for row in rows:
        print(" ".join(f"{v!s:>7}" for v in row[:6]), f"{row[6]:>14} {row[7]:>14} {row[8]:>7}")
    print(footer)
    return 0
