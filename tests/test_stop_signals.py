"""SIGINT / SIGTERM at any moment of a run end every rank in order: exit 0, or one clear line.

Real processes: ``ppstage demo`` in its own session (as a terminal's foreground
job: Ctrl-C reaches the whole group), ranks on a port chosen at run time, short
deadlines; every process of the session is killed in ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppstage.config import PPStageConfig
from ppstage.stages.launcher import free_port

pytestmark = pytest.mark.timeout(120)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "the run never reached the moment to signal"
        time.sleep(0.02)


def _session_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


# moment -> when to signal, judged from what the run has written so far
MOMENTS = {
    # the ranks were just spawned: their interpreters have no handler yet
    "ranks-spawned": lambda out, stdout: "logs in" in stdout(),
    # every rank is up and met (parity passed), no chunk finished yet or just one
    "ranks-met": lambda out, stdout: all("started" in _text(out / f"rank{r}.log") for r in range(3)),
    # chunks stream
    "streaming": lambda out, stdout: _lines(out / "chunks.jsonl") >= 2,
}


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.parametrize(("moment", "sig", "target"), [
    ("ranks-spawned", signal.SIGINT, "group"),   # Ctrl-C: every process of the job gets it
    ("ranks-spawned", signal.SIGTERM, "demo"),  # a supervisor stops the demo process only
    ("ranks-met", signal.SIGINT, "group"),
    ("streaming", signal.SIGTERM, "demo"),
])
def test_a_stop_signal_at_any_moment_of_a_demo_drains_every_rank_and_exits_0(tmp_path, moment, sig, target):
    out = tmp_path / "run"
    log = tmp_path / "demo.out"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ppstage.cli", "demo", "--chunks", "400", "--no-check", "--quiet",
             "--out", str(out), "--simulate-call-ms", "5"],
            cwd=tmp_path, env=_env(), stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
    try:
        _wait_for(lambda: MOMENTS[moment](out, log.read_text) or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        os.killpg(proc.pid, sig) if target == "group" else proc.send_signal(sig)
        proc.wait(timeout=60)
        _wait_for(lambda: _session_gone(proc.pid), timeout=10)  # no rank outlives the demo
    finally:
        if not _session_gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert f"stopped by {signal.Signals(sig).name}" in text and "every rank exited 0" in text, text
    for r in range(3):
        rank_log = _text(out / f"rank{r}.log")
        assert "Traceback" not in rank_log and "interrupted" not in rank_log, rank_log
    assert "Traceback" not in text and "FAILED" not in text, text


def _signal_while_the_config_loads(tmp_path: Path, command: list[str], sig: signal.Signals):
    """Run ``ppstage <command> --config FIFO ...`` and send ``sig`` while it reads its config.

    The config is a FIFO: the process is provably past its first moment (a reader
    is there) and before any rank when the signal comes; the config follows.
    Returns ``(process, stdout, stderr)``; every process of its session is killed after.
    """
    fifo = tmp_path / "pipeline.toml"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppstage.cli", *command, "--config", str(fifo), "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        end = time.monotonic() + 60
        while True:  # opening the writing end without blocking succeeds once the process is reading
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None, proc.communicate()
                time.sleep(0.02)
        proc.send_signal(sig)
        time.sleep(0.2)
        try:
            os.write(fd, PPStageConfig().to_toml().encode())
        except BrokenPipeError:
            pass  # it did not wait for its config: the caller's asserts say how it ended
        finally:
            os.close(fd)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, stdout, stderr


def test_a_stop_signal_before_any_rank_started_ends_the_demo_with_one_line_and_exit_0(tmp_path):
    proc, stdout, stderr = _signal_while_the_config_loads(tmp_path, ["demo", "--chunks", "2", "--no-check"],
                                                          signal.SIGINT)
    assert "Traceback" not in stdout + stderr, stderr
    assert proc.returncode == 0, stderr
    assert stderr.strip().splitlines() == ["ppstage demo: stopped by SIGINT before any rank started"], stderr
    assert not (tmp_path / "run" / "rank0.log").exists()


def test_a_stop_signal_while_a_rank_waits_for_peers_that_never_come_ends_it_within_the_drain_deadline(tmp_path):
    # Rank 1 of 3, alone: its rendezvous would wait runtime.startup_timeout_s (600 s).
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(PPStageConfig().with_overrides({"runtime.drain_deadline_s": 2.0}).to_toml())
    env = {**_env(), "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "ppstage.cli", "launch", "--config", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # into the rendezvous (the signal is honoured from the first moment anyway)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in stdout + stderr, stderr
    assert proc.returncode == 1, stderr
    assert "stopped by SIGTERM during start-up" in stderr and "2 s" in stderr, stderr
    assert took < 15, took


def test_only_a_stop_signal_starts_the_start_up_grace_period():
    # The wakeup fd also gets a byte for the flight recorder's SIGUSR1 ("dump, go on"):
    # that must not end a rank still starting up; a SIGTERM after it must.
    import threading

    from ppstage.stages.stop import StopRequest

    expired: list[str] = []
    done = threading.Event()
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda *_: None)
    stop = StopRequest.install()
    try:
        stop.watch_startup(0.3, lambda name: (expired.append(name), done.set()))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not done.wait(1.5), expired  # 5x the grace period: no expiry for a dump request
        os.kill(os.getpid(), signal.SIGTERM)
        assert done.wait(10.0)
        assert expired == ["SIGTERM"] and stop.signal_name == "SIGTERM"
    finally:
        signal.set_wakeup_fd(-1)
        stop.restore()
        signal.signal(signal.SIGUSR1, previous_usr1)


def test_a_sigterm_while_serve_loads_its_config_ends_it_with_one_line_and_exit_0(tmp_path):
    """``ppstage serve`` installs its stop handler first, as the demo does: a supervisor's
    SIGTERM while the config loads was a silent death by signal (exit 143); now it is one
    line and exit 0, and no rank starts."""
    proc, stdout, stderr = _signal_while_the_config_loads(tmp_path, ["serve", "--port", "0"], signal.SIGTERM)
    assert "Traceback" not in stdout + stderr, stderr
    assert proc.returncode == 0, (proc.returncode, stderr)
    assert stderr.strip().splitlines() == ["ppstage serve: stopped by SIGTERM before any rank started"], stderr
    assert not (tmp_path / "run" / "rank0.log").exists()
