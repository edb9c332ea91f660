"""``ppstage bench``'s command line: each bench takes its own flags, says PASS or FAIL once, and
exits 1 on a missed target only when asked (``--strict``).

No bench is timed here: the multi-process ones run with their pipeline replaced by
fixed figures (``run_once``, ``run_protocol_bench``), so every verdict is known in advance.
"""

from __future__ import annotations

import pytest

from ppstage.bench import overlap_bench as ob
from ppstage.bench import protocol_bench as pb
from ppstage.bench.pipeline_bench import PipelineBenchResult, StagesResult
from ppstage.bench.pipeline_bench import format_report as pipeline_report
from ppstage.bench.record_bench import RecordBenchResult
from ppstage.bench.record_bench import format_report as record_report
from ppstage.bench.transport_bench import SizeResult, TransportBenchResult
from ppstage.bench.transport_bench import format_report as transport_report
from ppstage.cli import build_parser, main
from ppstage.cli.bench import BENCHES, FLAGS, exit_status


def usage_error(argv: list[str], capsys) -> str:
    """The one line a refused ``ppstage`` invocation prints (after asserting exit 2 and one line)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- flags: each bench takes its own, and names the benches a foreign one belongs to ------------


@pytest.mark.parametrize("argv, flag, takers", [
    (["transport", "--chunks", "5"], "--chunks", "pipeline, overlap, record"),
    (["protocol", "--viewers", "3"], "--viewers", "service"),
    (["pipeline", "--sizes=4KiB"], "--sizes", "transport"),
    (["overlap", "--rounds", "2"], "--rounds", "transport, pipeline, record"),
    (["service", "--strict"], "--strict", "protocol, transport, pipeline, overlap, record"),
])
def test_a_flag_of_another_bench_is_refused_naming_the_benches_that_take_it(capsys, argv, flag, takers):
    line = usage_error(["bench", *argv], capsys)
    assert line.startswith(f"ppstage bench {argv[0]}: error: {flag} is not a flag of bench {argv[0]}"), line
    assert f"taken by bench {takers}" in line


def test_every_flag_is_refused_by_exactly_the_benches_the_table_leaves_out(capsys):
    for flag in FLAGS:
        for bench in BENCHES:
            if bench in flag.uses:
                continue
            line = usage_error(["bench", bench, flag.name], capsys)
            assert f"{flag.name} is not a flag of bench {bench}; it is taken by bench {', '.join(flag.uses)}" in line


@pytest.mark.parametrize("argv, words", [
    (["transport", "--sizes", "0"], "argument --sizes: a size must be a whole number of bytes >= 1"),
    (["transport", "--sizes", "4KB"], "argument --sizes: not a size: '4KB' (a byte count or KiB"),
    (["transport", "--sizes", "1.5"], "a size must be a whole number of bytes"),
    (["pipeline", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["overlap", "--stages", "2", "3"], "unrecognized arguments: 3"),  # overlap runs one K
])
def test_a_refused_value_is_one_line_not_the_usage_of_every_flag(capsys, argv, words):
    line = usage_error(["bench", *argv], capsys)
    assert line.startswith(f"ppstage bench {argv[0]}: error: ") and words in line, line


def test_an_unknown_bench_gets_the_short_usage_line_and_the_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "nosuch"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["usage: ppstage bench [-h] TARGET ...", err[1]] and "invalid choice: 'nosuch'" in err[1]


@pytest.mark.parametrize("argv, expected", [
    # The documented invocations (README, docs/, scripts/gpu_check.sh) and the defaults they rely on.
    (["protocol"], dict(iterations=20_000, repeats=7, strict=False)),
    (["protocol", "--iterations", "20000"], dict(iterations=20_000)),
    (["transport"], dict(sizes=None, rounds=5)),
    (["transport", "--sizes", "4KiB", "64KiB", "1MiB", "16MiB", "--rounds", "3"],
     dict(sizes=[4 << 10, 64 << 10, 1 << 20, 16 << 20], rounds=3)),
    (["pipeline"], dict(stages=[1, 2, 3], chunks=24, rounds=1, timeout=300.0)),
    (["pipeline", "--stages", "1", "2", "--chunks", "16", "--rounds", "3"], dict(stages=[1, 2], chunks=16, rounds=3)),
    (["overlap"], dict(chunks=16, stages=2, simulate_decode_ms=40.0, simulate_call_ms=None, modes=None,
                       depths=None, cases=None, full=False, png=None, timeout=300.0)),
    (["overlap", "--chunks", "12", "--png", "o.png", "--full"], dict(chunks=12, png="o.png", full=True)),
    (["overlap", "--modes", "r0a", "--cases", "stage0", "--depths", "1", "2"],
     dict(modes=["r0a"], cases=["stage0"], depths=[1, 2])),
    (["service", "--seconds", "5"], dict(seconds=5.0, viewers=50)),
    (["record"], dict(chunks=12, rounds=2)),
    (["record", "--strict"], dict(strict=True)),
])
def test_every_documented_invocation_parses_to_its_defaults(argv, expected):
    args = build_parser().parse_args(["bench", *argv])
    assert args.target == argv[0]
    assert {k: getattr(args, k) for k in expected} == expected


# -- exit status: a bench that ran exits 0, unless --strict and a target was missed -------------


@pytest.mark.parametrize("met, strict, status", [(True, False, 0), (False, False, 0), (True, True, 0), (False, True, 1)])
def test_only_a_missed_target_under_strict_exits_1(met, strict, status):
    assert exit_status(met, strict=strict) == status


def _protocol_result(msgspec_us: float) -> pb.ProtocolBenchResult:
    return pb.ProtocolBenchResult(iterations=1, repeats=1, encode_us=1.0, decode_us=1.0, validate_us=1.0,
                                  msgspec_us=msgspec_us, pickle_us=200.0, msgspec_meta_bytes=1, pickle_meta_bytes=2)


@pytest.mark.parametrize("strict", [False, True])
def test_bench_protocol_missing_its_target_exits_1_only_under_strict(monkeypatch, capsys, strict):
    monkeypatch.setattr(pb, "run_protocol_bench", lambda iterations, repeats: _protocol_result(100.0))
    assert main(["bench", "protocol", *(["--strict"] if strict else [])]) == (1 if strict else 0)
    assert "than pickle: FAIL" in capsys.readouterr().out


def test_bench_protocol_meeting_its_target_exits_0_under_strict(monkeypatch, capsys):
    monkeypatch.setattr(pb, "run_protocol_bench", lambda iterations, repeats: _protocol_result(5.0))
    assert main(["bench", "protocol", "--strict"]) == 0
    assert "than pickle: PASS" in capsys.readouterr().out


def _size(nbytes: int, framed_us: float) -> SizeResult:
    return SizeResult(nbytes=nbytes, iterations=3, raw_us=100.0, framed_us=framed_us, legacy_us=300.0, hop_us=400.0)


def _pipeline(k2_ms: float) -> PipelineBenchResult:
    rows = tuple(StagesResult(stages=k, hops="fused", generator_ms=ms, period_ms=ms, loop_cpu_pct=1.0, runs=1)
                 for k, ms in ((1, 10.0), (2, k2_ms)))
    return PipelineBenchResult(chunks=6, rows=rows)


def _record(hook_ms: float) -> RecordBenchResult:
    return RecordBenchResult(stages=2, chunks=12, rounds=2, chunk_off_s=0.01, chunk_on_s=0.01, period_off_s=0.02,
                             period_on_s=0.02, hook_s=hook_ms / 1e3)


@pytest.mark.parametrize("result, report, passed", [
    (TransportBenchResult(rounds=1, sizes=(_size(64 << 10, 120.0), _size(1 << 20, 105.0))), transport_report, True),
    (TransportBenchResult(rounds=1, sizes=(_size(64 << 10, 400.0), _size(1 << 20, 105.0))), transport_report, False),
    (TransportBenchResult(rounds=1, sizes=(_size(64 << 10, 120.0), _size(1 << 20, 200.0))), transport_report, False),
    (TransportBenchResult(rounds=1, sizes=(_size(4 << 10, 900.0),)), transport_report, True),  # no target covered
    (_pipeline(11.0), pipeline_report, True),
    (_pipeline(20.0), pipeline_report, False),
], ids=["transport-met", "transport-64k-missed", "transport-1m-missed", "transport-none", "pipeline-met",
        "pipeline-missed"])
def test_a_reports_verdicts_and_its_passed_flag_come_from_the_same_targets(result, report, passed):
    text = report(result)
    assert result.passed is passed
    assert ("FAIL" in text) is (not passed)
    assert text.count("PASS") + text.count("FAIL") == len(result.targets())


@pytest.mark.parametrize("hook_ms, passed", [(0.1, True), (1.0, False)])
def test_bench_record_target_is_the_hook_share_of_chunk_time(hook_ms, passed):
    r = _record(hook_ms)
    assert r.passed is passed
    assert ("target: < 3 % of chunk time: met" in record_report(r)) is passed


# -- overlap: each row once, then its verdicts --------------------------------------------------


def _fake_run_once(period_ms: float):
    def run_once(config, chunks, *, timeout_s):
        return {"summary": {"median_period_ms": period_ms, "median_s0_ms": 10.0, "median_s1_ms": 10.0,
                            "overlap_score": 0.5, "max_in_flight": 2, "max_decode_queue": 1,
                            "loop_cpu_pct_of_period": 3.0}}
    return run_once


@pytest.mark.parametrize("period_ms, strict, status", [(12.0, True, 0), (100.0, False, 0), (100.0, True, 1)])
def test_bench_overlap_prints_each_row_once_and_exits_1_on_a_missed_target_under_strict(
    monkeypatch, capsys, period_ms, strict, status
):
    monkeypatch.setattr(ob, "run_once", _fake_run_once(period_ms))
    argv = ["bench", "overlap", "--modes", "r0a", "--chunks", "8", *(["--strict"] if strict else [])]
    assert main(argv) == status
    out = capsys.readouterr().out
    assert out.count("mode case") == 1  # the column header
    for schedule in ("anchor-first", "decode-first", "sequential"):
        rows = [line for line in out.splitlines() if line.startswith("r0a ") and f" {schedule} " in line]
        assert len(rows) == 1, out
    assert out.count("target r0a balanced D=2") == 1
    assert ("FAIL" in out) is (period_ms == 100.0)


def test_an_overlap_sweep_of_too_few_chunks_is_refused_when_built():
    with pytest.raises(ValueError, match="--chunks must be >= 8"):
        ob.OverlapSweep(chunks=4)


# -- sizes: what is measured is what the row says -------------------------------------------


@pytest.mark.parametrize("text, nbytes", [
    ("65536", 65536), ("4KiB", 4096), ("4kib", 4096), ("1.5KiB", 1536), ("1MiB", 1 << 20), ("2GiB", 2 << 30),
])
def test_a_size_is_a_byte_count_or_a_binary_multiple(text, nbytes):
    from ppstage.cli.bench import _size

    assert _size(text) == nbytes


@pytest.mark.parametrize("text", ["4KB", "4kb", "1MB", "4k", "1.5", "0", "-1", "abc", "4 KiB B"])
def test_an_ambiguous_or_fractional_size_is_refused(text):
    import argparse

    from ppstage.cli.bench import _size

    with pytest.raises(argparse.ArgumentTypeError):
        _size(text)


def test_a_row_label_is_the_exact_size_measured():
    from ppstage.bench.transport_bench import _size_label as label

    assert [label(n) for n in (4096, 1536, 1 << 20, 3 << 19, 256)] == ["4 KiB", "1536 B", "1 MiB", "1536 KiB", "256 B"]


def test_the_transport_bench_refuses_a_size_it_would_round_before_starting_anything():
    from ppstage.bench.transport_bench import run_transport_bench

    with pytest.raises(ValueError, match=r"multiple of 256 bytes.*\[1000\]"):
        run_transport_bench((4096, 1000), rounds=1)
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        run_transport_bench((4096,), rounds=0)


# -- service: frames are counted over the phase's own window ----------------------------------


def test_the_service_bench_counts_frames_in_the_phase_window_and_only_viewers_it_kept():
    """A real aiohttp server emits one chunk (3 frames to every viewer) per tick and refuses a
    third viewer with 503, as ``ppstage serve`` does above ``service.max_viewers``. Frames sent
    while viewers connect (the bench's 1 s connect pause) are outside the phase; before the fix
    they were counted, giving ~100 chunks' worth of frames too many."""
    import asyncio
    import os

    import aiohttp
    from aiohttp import web

    from ppstage.bench.service_bench import _measure

    async def scenario():
        chunks = 0
        sockets: list[web.WebSocketResponse] = []

        async def status(request):
            return web.json_response({"chunks_emitted": chunks})

        async def frames(request):
            if len(sockets) >= 2:
                return web.Response(status=503, text="too many viewers")
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            sockets.append(ws)
            async for _ in ws:
                pass
            return ws

        async def ticker():
            nonlocal chunks
            while True:
                await asyncio.sleep(0.01)
                for ws in list(sockets):  # the frames of a chunk go out before it counts as emitted
                    for _ in range(3):
                        await ws.send_bytes(b"f")
                chunks += 1

        app = web.Application()
        app.add_routes([web.get("/v1/status", status), web.get("/v1/frames", frames)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        tick = asyncio.ensure_future(ticker())
        try:
            async with aiohttp.ClientSession() as http:
                return await _measure(http, f"http://127.0.0.1:{port}", os.getpid(), "3 viewers", 0.5, 3)
        finally:
            tick.cancel()
            for ws in sockets:
                await ws.close()
            await runner.cleanup()

    phase = asyncio.run(scenario())
    assert phase.viewers == 2  # the refused one is not averaged in with 0 frames
    assert phase.chunks > 0
    # Status and frames are read at slightly different moments: a chunk or two either way.
    assert abs(phase.frames_per_viewer - 3 * phase.chunks) <= 3 * 2, (phase.frames_per_viewer, phase.chunks)
