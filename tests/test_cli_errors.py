"""Every ``ppstage`` command ends a user error with one line and exit 2, never a traceback.

Each case runs the console script as a subprocess, as a user would: bad configs
(missing file, invalid TOML, unknown key, wrong type, out-of-range value,
unknown model backend) for every command that reads one, and bad flags for
every command. A typed runtime error of a run that started ends with exit 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ppstage.cli import COMMANDS, main
from ppstage.config import PPStageConfig
from protocol import ChunkId, ProtocolError

pytestmark = pytest.mark.timeout(240)

# name -> (TOML text or None for a missing file, a word the one-line message must contain)
BAD_CONFIGS = {
    "missing-file": (None, "No such file"),
    "invalid-toml": ("[model\ndim = 64\n", "cannot read config"),
    "unknown-key": ("[model]\ncolour = 'red'\n", "colour"),
    "unknown-section": ("[modle]\ndim = 64\n", "modle"),
    "wrong-type": ("[model]\ndim = 'big'\n", "model.dim"),
    "out-of-range": ("[runtime]\nd_in = 0\n", "runtime"),
    "inconsistent": ("[topology]\nstages = 9\n", "stages"),
    "unknown-backend": ("[model]\nbackend = 'no-such-model'\n", "model.backend"),
}
# Commands that read --config; bench takes none, log and replay read message logs (below).
LOG_COMMANDS = {"log": ["inspect"], "replay": []}
CONFIG_COMMANDS = [c for c in COMMANDS if c != "bench" and c not in LOG_COMMANDS]
COMMAND_ARGS = {"demo": ["--chunks", "2", "--no-check"], "launch": ["--chunks", "2"], "plan": ["--chunks", "2"],
                "reference": ["--chunks", "1"], "quality": ["--chunks", "1"], "config": [],
                "serve": ["--port", "0"], "soak": ["--chunks", "2"]}

BAD_FLAGS = [
    ("demo", ["--chunks", "0"]),
    ("demo", ["--stages", "two"]),
    ("demo", ["--timeout", "-1"]),
    ("demo", ["--prompt-at", "3"]),
    ("demo", ["--simulate-decode-ms", "-5"]),
    ("demo", ["--mode", "r9"]),
    ("launch", []),  # --config is required
    ("launch", ["--config", "x.toml", "--pause-at", "2:soon"]),
    ("config", ["--stages", "0"]),
    ("config", ["--backend", "mpi"]),
    ("plan", ["--cut-at", "-1"]),
    ("plan", ["--prompt", " "]),
    ("plan", ["--prompt-at", "x:a fox"]),
    ("reference", ["--threads", "0"]),
    ("reference", ["--chunks", "many"]),
    ("quality", ["--threshold", "loud"]),
    ("quality", ["--baseline", "r9"]),
    ("bench", ["nothing"]),
    ("bench", ["protocol", "--iterations", "0"]),
    ("serve", []),  # --config is required
    ("serve", ["--config", "x.toml", "--port", "70000"]),
    ("soak", ["--stages", "0"]),
    ("soak", ["--max-delay-ms", "-1"]),
    ("log", []),  # a subcommand is required
    ("log", ["inspect"]),  # at least one LOG
    ("replay", ["x.ppslog", "--from-epoch", "-1"]),
    ("replay", ["x.ppslog", "--bisect", "--inject", "stale"]),
    ("nosuchcommand", []),
    ("demo", ["--no-such-flag"]),
    ("demo", ["--timeout", "inf"]),
    ("plan", ["--cut-at", "0"]),
    ("bench", ["transport", "--no-such-flag"]),
]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def ppstage(args: list[str], cwd, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return subprocess.run(
        [sys.executable, "-m", "ppstage.cli", *args], cwd=cwd, env={**base, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess, command: str, status: int, word: str, *, case: str = ""
) -> None:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, (case, output)
    assert proc.returncode == status, (case, output)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, (case, proc.stderr)
    assert lines[0].startswith(f"ppstage {command}: ") and word in lines[0], (case, lines[0])


def test_every_command_is_covered():
    assert set(CONFIG_COMMANDS) | {"bench"} | set(LOG_COMMANDS) == set(COMMANDS)
    assert {c for c, _ in BAD_FLAGS} >= set(COMMANDS)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_a_bad_config_ends_with_one_line_and_status_2(tmp_path, command):
    runs = {}
    for case, (text, word) in BAD_CONFIGS.items():
        path = tmp_path / f"{case}.toml"
        if text is not None:
            path.write_text(text)
        runs[case] = ([command, "--config", str(path), *COMMAND_ARGS[command]], word)
    # The cases are independent processes: run them side by side (start-up dominates).
    with ThreadPoolExecutor(4) as pool:
        done = {case: pool.submit(ppstage, argv, tmp_path) for case, (argv, _) in runs.items()}
    for case, future in done.items():
        assert_one_line_error(future.result(), command, 2, runs[case][1], case=case)
    assert not list(tmp_path.glob("ppstage-demo-*")) and not (tmp_path / "out").exists()  # nothing ran


# name -> (file bytes or None for a missing file, a word the one-line message must contain)
BAD_LOGS = {
    "missing-file": (None, "No such file"),
    "random-bytes": (bytes(range(256)) * 4, "ppslog"),
    "empty": (b"", "ppslog"),
}


@pytest.mark.parametrize("command", sorted(LOG_COMMANDS))
def test_a_bad_message_log_ends_with_one_line_and_status_2(tmp_path, command):
    for case, (data, word) in BAD_LOGS.items():
        path = tmp_path / f"{case}.ppslog"
        if data is not None:
            path.write_bytes(data)
        proc = ppstage([command, *LOG_COMMANDS[command], str(path)], tmp_path)
        output = proc.stdout + proc.stderr
        assert "Traceback" not in output, (case, output)
        assert proc.returncode == 2, (case, output)
        assert word in proc.stderr, (case, proc.stderr)


def test_a_bad_flag_is_a_usage_error_with_status_2(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        done = [(c, f, pool.submit(ppstage, [c, *f], tmp_path)) for c, f in BAD_FLAGS]
    for command, flags, future in done:
        proc = future.result()
        assert "Traceback" not in proc.stdout + proc.stderr, (command, flags, proc.stderr)
        assert proc.returncode == 2, (command, flags, proc.stderr)
        assert "error:" in proc.stderr.strip().splitlines()[-1], (command, flags, proc.stderr)


def test_launch_outside_torchrun_names_the_missing_environment(tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(PPStageConfig().to_toml())
    proc = ppstage(["launch", "--config", str(cfg)], tmp_path)
    assert_one_line_error(proc, "launch", 2, "RANK")


@pytest.mark.parametrize("world", [2, 5])
def test_launch_with_a_world_size_other_than_the_configs_is_refused_at_once(tmp_path, world):
    # Before any process group: a rank of a wrong-sized world must not wait out the
    # start-up timeout (600 s) in a rendezvous that can never complete.
    from ppstage.stages.launcher import free_port

    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(PPStageConfig().to_toml())  # 1 + 2 stages x tp 1 = 3
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = ppstage(["launch", "--config", str(cfg), "--chunks", "2"], tmp_path, env=env, timeout=30)
    assert_one_line_error(proc, "launch", 2, f"WORLD_SIZE {world}")
    assert "1 + 2 x 1 = 3" in proc.stderr, proc.stderr


def test_a_typed_runtime_error_ends_with_one_line_and_status_1(monkeypatch, capsys):
    import ppstage.cli.plan as plan

    def broken(args):
        raise ProtocolError("the wire said no", chunk=ChunkId(call_id=4, chunk_index=3, cache_epoch=1))

    monkeypatch.setattr(plan, "run", broken)
    assert main(["plan"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ppstage plan: ProtocolError: the wire said no (call_id=4, chunk_index=3, cache_epoch=1)"]


def test_a_demo_run_that_fails_reports_it_and_exits_1(tmp_path):
    # A tampered envelope (break-it B5): the run starts, the receiving leader refuses it.
    drill = tmp_path / "drill.toml"
    drill.write_text('[[faults.drill]]\nkind = "corrupt_envelope"\nrank = 0\nchunk = 1\n')
    out = tmp_path / "run"
    proc = ppstage(["demo", "--chunks", "4", "--quiet", "--config", str(drill), "--out", str(out),
                    "--timeout", "150"], tmp_path, timeout=200)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stderr and "DigestMismatch" in proc.stderr


def test_a_demo_timeout_says_so_and_shows_every_ranks_log(tmp_path):
    out = tmp_path / "run"
    proc = ppstage(["demo", "--chunks", "100000", "--no-check", "--quiet", "--out", str(out), "--timeout", "2"],
                   tmp_path)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "timed out after 2 s" in proc.stderr
    for rank in range(3):
        assert f"--- rank {rank} (killed at the timeout) last log lines ---" in proc.stderr


@pytest.mark.parametrize(
    "toml, words",
    [('[topology]\nbackend = "nccl"\n', "backend nccl needs CUDA"), ('[runtime]\ndevice = "cuda"\n', "needs CUDA")],
    ids=["nccl", "device-cuda"],
)
def test_asking_for_cuda_where_torch_has_none_is_refused_before_any_rank_starts(tmp_path, toml, words):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(toml)
    assert_one_line_error(ppstage(["demo", "--config", str(cfg), "--chunks", "2"], tmp_path), "demo", 2, words)


@pytest.mark.parametrize("bench, flags, words", [
    ("pipeline", ["--chunks", "4"], "--chunks must be >= 6"),
    ("overlap", ["--chunks", "4"], "--chunks must be >= 8"),
    ("overlap", ["--chunks", "8", "--png", "/nonexistent/x.png"], "folder /nonexistent does not exist"),
    ("transport", ["--sizes", "1000"], "every size must be a multiple of 256 bytes"),
    ("service", ["--viewers", "300"], "at most service.max_viewers = 256"),
    ("record", ["--chunks", "2"], "--chunks must be >= 3"),
])
def test_a_bench_refusing_its_sizes_ends_with_one_line_and_status_2(tmp_path, bench, flags, words):
    assert_one_line_error(ppstage(["bench", bench, *flags], tmp_path), "bench", 2, words)


@pytest.mark.parametrize("command", ["demo", "plan", "reference"])
def test_an_event_after_the_last_chunk_is_refused_not_silently_dropped(tmp_path, command):
    proc = ppstage([command, "--chunks", "4", "--cut-at", "9"], tmp_path)
    assert_one_line_error(proc, command, 2, "--cut-at 9: beyond the run's 4 chunk(s)")


def test_a_bench_run_past_its_timeout_is_one_typed_line_with_status_1(tmp_path):
    """``--timeout`` kills the pipeline run; the bench says so in one line (was a traceback
    ending in ``exit codes [None, None]``), and leaves no rank behind (the launcher reaps them)."""
    proc = ppstage(["bench", "pipeline", "--stages", "1", "--chunks", "6", "--timeout", "0.5"], tmp_path)
    assert_one_line_error(proc, "bench", 1, "timed out after 0.5 s (--timeout); every rank was killed")


@pytest.mark.parametrize("argv, words", [
    (["demo", "--timeout", "inf"], "argument --timeout: must be a finite number, got inf"),
    (["demo", "--simulate-call-ms", "nan"], "argument --simulate-call-ms: must be a finite number, got nan"),
    (["soak", "--max-delay-ms=-inf"], "argument --max-delay-ms: must be a finite number, got -inf"),
    (["plan", "--cut-at", "0"], "argument --cut-at: chunk 0 always starts with a fresh cache"),
    (["demo", "--cut-at", "0"], "argument --cut-at: chunk 0 always starts with a fresh cache"),
    (["reference", "--cut-at", "0"], "argument --cut-at: chunk 0 always starts with a fresh cache"),
    (["quality", "--cut-at", "0"], "argument --cut-at: chunk 0 always starts with a fresh cache"),
    (["launch", "--config", "x.toml", "--cut-at", "0"], "argument --cut-at: chunk 0 always starts with a fresh cache"),
])
def test_a_flag_value_that_is_not_finite_or_would_do_nothing_is_refused_by_name(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ppstage {argv[0]}: error: ") and words in last, last


@pytest.mark.parametrize("command", ["demo", "plan", "reference"])
def test_two_prompts_at_one_chunk_are_refused_not_silently_dropped(tmp_path, command):
    proc = ppstage([command, "--chunks", "4", "--prompt-at", "1:a fox", "--prompt-at", "1:a wolf"], tmp_path)
    assert_one_line_error(proc, command, 2, "--prompt-at 1: given twice ('a fox', 'a wolf')")
