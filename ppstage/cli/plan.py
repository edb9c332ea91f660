"""``ppstage plan``: run the planner over a scripted stream and print the plan table."""

from __future__ import annotations

import argparse

from ppstage.cli.args import config_from_args, cut_chunk, positive_int, prompt_at, text

HELP = "print the lifecycle plan of a scripted stream (no model, no processes)"
CONFIG_FLAGS = {"mode": "recompute.mode"}  # given flags override the config's key
COLUMNS = ("chunk", "call", "epoch", "start", "init", "xattn", "recompute", "calls", "context", "source", "offset", "prompt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=positive_int, default=8)
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default=None, help="recompute mode (default: config's, r0a)")
    p.add_argument("--cut-at", type=cut_chunk, action="append", default=[], metavar="K")
    p.add_argument("--prompt", type=text, default="a red fox running through snow")
    p.add_argument("--prompt-at", type=prompt_at, action="append", default=[], metavar="K:TEXT")
    p.add_argument("--config", default=None, help="TOML config file")


def parse_prompt_at(values: list[str]) -> dict[int, str]:
    """``--prompt-at K:TEXT`` values (checked by the argparse type) as ``{chunk: prompt}``.

    Raises ``ConfigError`` for two prompts at one chunk: one of them would silently never be used.
    """
    prompts: dict[int, str] = {}
    for k, _, prompt in (v.partition(":") for v in values):
        if int(k) in prompts:
            from ppstage.config import ConfigError

            raise ConfigError(f"--prompt-at {int(k)}: given twice ({prompts[int(k)]!r}, {prompt!r}); "
                              "one prompt per chunk")
        prompts[int(k)] = prompt
    return prompts


def run(args: argparse.Namespace) -> int:
    from ppstage.cli.output import console, is_terminal, table
    from ppstage.core.planner import HardCut, Planner, PromptUpdate, StreamStart

    cfg = config_from_args(args, CONFIG_FLAGS)
    from ppstage.model.loader import load_backend

    load_backend(cfg)  # no model runs here, but a config naming an unknown backend is still refused
    script = script_from_args(args)  # refuses a --cut-at / --prompt-at beyond the last chunk, or twice at one
    planner = Planner(cfg)
    planner.submit(StreamStart(args.prompt))
    rows = []
    for k in range(args.chunks):
        if k in script.cut_at:
            planner.submit(HardCut())
        if k in script.prompt_at:
            planner.submit(PromptUpdate(script.prompt_at[k]))
        p = planner.next_chunk()
        rows.append((
            p.chunk_index,
            p.call_id,
            p.cache_epoch,
            p.current_start_frame,
            int(p.init_cache),
            int(p.reset_crossattn_cache),
            int(p.do_kv_recompute),
            p.expected_generator_calls,
            ",".join(map(str, p.context_frame_indices)) or "-",
            p.context_source,
            f"{p.position_offset}{'*' if p.rebased else ''}",  # * = re-based at this boundary
            p.prompt,
        ))
    if is_terminal():
        title = f"plan: mode {cfg.recompute.mode}, {args.chunks} chunks"
        console().print(table(title, COLUMNS, rows, right=COLUMNS[:8]))
        return 0
    # Plain: fixed-width columns, the prompt last (it may hold spaces).
    print(" ".join(f"{c:>8}" for c in COLUMNS[:-1]), " prompt")
    for row in rows:
        print(" ".join(f"{v!s:>8}" for v in row[:-1]), f" {row[-1]}")
    return 0


def script_from_args(args: argparse.Namespace):
    """The stream's events (``StreamScript``) from the flags, or from ``--script`` (``ppstage soak``).

    Raises ``ConfigError`` for a ``--cut-at`` / ``--prompt-at`` at or past
    ``--chunks``, or two ``--prompt-at`` at one chunk: it would silently never happen.
    """
    from ppstage.model.reference import DEFAULT_PROMPT, StreamScript

    if getattr(args, "script", None):  # a generated stream (``ppstage soak``)
        import msgspec
        from pathlib import Path

        return msgspec.json.decode(Path(args.script).read_bytes(), type=StreamScript)

    script = StreamScript(
        prompt=args.prompt or DEFAULT_PROMPT,
        cut_at=tuple(args.cut_at),
        prompt_at=parse_prompt_at(args.prompt_at),
    )
    chunks = getattr(args, "chunks", None)
    if chunks is not None:  # a bounded run: an event after its last chunk would silently never happen
        from ppstage.config import ConfigError

        late = [f"--cut-at {k}" for k in script.cut_at if k >= chunks]
        late += [f"--prompt-at {k}:..." for k in sorted(script.prompt_at) if k >= chunks]
        if late:
            raise ConfigError(f"{', '.join(late)}: beyond the run's {chunks} chunk(s) (chunk indices 0..{chunks - 1})")
    return script
