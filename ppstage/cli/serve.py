"""``ppstage serve``: the pipeline as a long-running service; rank 0 serves the HTTP API.

Two ways to run it:

- locally (no ``RANK`` in the environment): starts rank 0 and every generator
  rank as local processes (as ``ppstage demo`` does, embedded model), each
  running ``ppstage serve`` in its rank, and supervises them: SIGTERM/SIGINT go
  to rank 0, which drains and shuts the chain down;
- under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set):
  runs this process's rank; rank 0 serves.

The stream runs until SIGTERM or ``POST /v1/shutdown``. Exit status: 0 after
an orderly drain, 1 for a pipeline failure, 2 for a refused start (bad config,
R0 without a passing quality report, no token off loopback).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import tempfile

from ppstage.cli.args import port_number

HELP = "run the pipeline as a service until stopped: HTTP API, live frames, metrics (rank 0 serves)"
TOKEN_ENV = "PPSTAGE_API_TOKEN"
EXIT_REFUSED = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML config file (identical on every rank)")
    p.add_argument("--host", default=None, help="bind address of the HTTP API (default: service.host, 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=None, help="HTTP port (default: service.port, 8000)")
    p.add_argument("--prompt", default=None, help="the stream's first prompt")
    p.add_argument("--r0-quality-report", default=None,
                   help="passing `ppstage quality` report for this config (required for recompute.mode r0)")
    p.add_argument("--force-unvalidated", action="store_true",
                   help="start mode r0 without a passing quality report (loud warning in logs, status, metrics)")
    p.add_argument("--token-file", default=None,
                   help=f"file holding the API bearer token (default: ${TOKEN_ENV}); required off loopback")
    p.add_argument("--out", default=None, help="local mode: directory for the ranks' logs (default: a temp dir)")
    p.add_argument("--summary-out", default=None, help="rank 0 writes its run summary (JSON) here at exit")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--record", default=None, metavar="DIR",
                   help="every rank writes its message log to DIR/rank<r>.ppslog (docs/replay.md)")
    p.add_argument("--flight-dir", default=None, metavar="DIR",
                   help="where a failing rank writes its flight recorder (default: the record dir, else .)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file) as f:
            return f.read().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    from ppstage.stages.stop import StopRequest

    # First of all, as ``ppstage demo`` does: a SIGTERM while the config and the
    # backend load would otherwise kill this process without a word (exit 143).
    with StopRequest.installed() as stop:
        return _run(args, stop)


def _run(args: argparse.Namespace, stop) -> int:
    from ppstage.config import ConfigError, PPStageConfig
    from ppstage.service.options import ServiceOptions

    warnings: list[str] = []
    try:
        config = PPStageConfig.from_toml(args.config)
        from ppstage.model.loader import load_backend

        load_backend(config)  # an unknown [model] backend is refused before any rank starts
        if args.r0_quality_report:
            config = config.with_overrides({"recompute.r0_quality_report": args.r0_quality_report})
        host = args.host if args.host is not None else config.service.host
        port = args.port if args.port is not None else config.service.port
        token = _token(args)
        serves = os.environ.get("RANK", "0") == "0"  # local mode, or rank 0 under torchrun
        if serves and token is None and not is_loopback(host):
            raise ConfigError(
                f"binding {host} (not loopback) needs an API token: set ${TOKEN_ENV} or --token-file"
            )
        if config.recompute.mode == "r0":
            # The R0 rollout gate, on every rank before any collective so that all refuse together.
            from ppstage.model.quality import QualityError, check_quality_report

            try:
                check_quality_report(config)
            except QualityError as exc:
                if not args.force_unvalidated:
                    raise
                warnings.append(
                    f"recompute mode r0 is running WITHOUT a passing quality report "
                    f"(--force-unvalidated): {exc}"
                )
    except (ConfigError, OSError) as exc:
        print(f"ppstage serve: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    options = ServiceOptions(host=host, port=port, token=token, unvalidated=bool(warnings), warnings=tuple(warnings))
    if "RANK" in os.environ:
        return _run_rank(config, options, args, stop)
    return _run_local(config, options, args, stop)


def _run_rank(config, options, args: argparse.Namespace, stop) -> int:
    from ppstage.model.reference import DEFAULT_PROMPT, StreamScript
    from ppstage.stages.process import RankOptions, exit_process, run_rank

    from ppstage.cli.launch import check_world_size, torchrun_rank

    # ConfigErrors (missing or non-integer torchrun variables, a world the config
    # does not describe): one line, exit 2, before any rendezvous.
    rank, world = torchrun_rank()
    check_world_size(config, world)
    if options.unvalidated:
        print(f"ppstage serve: WARNING: {options.warnings[0]}", file=sys.stderr, flush=True)
    opts = RankOptions(
        rank=rank,
        world_size=world,
        master_addr=None,  # env:// (MASTER_ADDR / MASTER_PORT), as torchrun sets them
        chunks=None,
        script=StreamScript(prompt=args.prompt or DEFAULT_PROMPT),
        summary_out=args.summary_out,
        json_logs=True,
        log_level=args.log_level,
        progress=False,
        service=options if rank == 0 else None,
        # A forced start is a rank-local flag that changes what runs: all ranks must agree.
        parity_extra={"serve.force_unvalidated": str(bool(args.force_unvalidated))},
        record_dir=args.record,
        flight_dir=args.flight_dir,
    )
    exit_process(run_rank(config, opts, stop))  # a stop since start-up becomes a drained stop
    return 0  # not reached


def _port_free(host: str, port: int) -> None:
    """Refuse a taken port before any rank starts (rank 0 would fail only after the rendezvous)."""
    import socket

    from ppstage.config import ConfigError

    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port: cannot bind {host}:{port}: {exc.strerror}") from None


def _run_local(config, options, args: argparse.Namespace, stop) -> int:
    from ppstage.stages.launcher import start_pipeline

    _port_free(options.host, options.port)
    if stop.requested:  # nothing started yet: nothing to drain
        print(f"ppstage serve: stopped by {stop.signal_name} before any rank started", file=sys.stderr)
        return 0

    out = args.out or tempfile.mkdtemp(prefix="ppstage-serve-")
    t = config.topology
    child_args = ["--host", options.host, "--port", str(options.port), "--log-level", args.log_level]
    if args.prompt:
        child_args += ["--prompt", args.prompt]
    if args.force_unvalidated:
        child_args.append("--force-unvalidated")
    if args.token_file:
        child_args += ["--token-file", os.path.abspath(args.token_file)]
    if args.record:
        child_args += ["--record", os.path.abspath(args.record)]
    pipe = start_pipeline(config, out, chunks=None, launch_args=child_args, command="serve")
    print(f"ppstage serve: http://{options.host}:{options.port}/  rank 0 + {t.stages} stage(s) x tp {t.tp} "
          f"= {t.world_size} processes, mode {config.recompute.mode}, logs in {out}", flush=True)
    if options.unvalidated:
        print(f"ppstage serve: WARNING: {options.warnings[0]}", file=sys.stderr, flush=True)
    # Either stop signal, now or during the ranks' start-up: rank 0 stops planning
    # and drains the pipeline (a service stops the way its own shutdown does).
    stop.hand_over(lambda: pipe.signal_rank0(signal.SIGTERM))
    try:
        codes = pipe.wait(float("inf"))
    finally:
        pipe.kill()
    if args.summary_out and pipe.summary_path.exists():
        with open(args.summary_out, "wb") as f:
            f.write(pipe.summary_path.read_bytes())
    if any(c != 0 for c in codes):
        print(f"ppstage serve: FAILED, exit codes by rank {codes}", file=sys.stderr)
        for r, c in enumerate(codes):
            if c != 0:
                print(f"--- rank {r} (exit {c}) log tail ---\n{pipe.log_tail(r)}", file=sys.stderr)
        return 1
    print("ppstage serve: drained, every rank exited 0", flush=True)
    return 0
