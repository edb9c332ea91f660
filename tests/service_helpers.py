"""Start a real ``ppstage serve`` (local mode: it starts its ranks) and talk to it.

``ServiceProc`` always reaps: ``stop()`` sends SIGTERM and waits, and kills the
whole process group if the service does not exit in time. The ranks also die
on their own when the ``serve`` parent vanishes (the launcher watch).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ppstage.config import PPStageConfig
from ppstage.stages.launcher import free_port

TOKEN = "test-token-5f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def service_config(**overrides) -> PPStageConfig:
    """Two stages, fast deadlines, a simulated generator cost so the stream idles a little."""
    base = {
        "topology.stages": 2,
        "runtime.pg_timeout_s": 30.0,
        "runtime.stage_idle_deadline_s": 8.0,
        "runtime.keepalive_interval_s": 0.5,
        "runtime.drain_deadline_s": 15.0,
        "runtime.result_deadline_min_s": 15.0,
        "runtime.simulated_call_ms": 8.0,
    }
    base.update(overrides)
    return PPStageConfig().with_overrides(base)


@dataclass
class ServiceProc:
    proc: subprocess.Popen
    url: str
    out: Path
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        parts = [self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""]
        for rank_log in sorted(self.out.glob("rank*.log")):
            parts.append(f"--- {rank_log.name} ---\n" + rank_log.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait; kill the group if it hangs. Returns the exit code (None: had to kill)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None
        finally:
            _kill_group(self.proc.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_service(tmp: Path, config: PPStageConfig, *, args: list[str] = (), env: dict | None = None,
                  ready_timeout: float = 90.0) -> ServiceProc:
    """``ppstage serve`` in local mode on a free port; returns once ``/readyz`` says ready."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "service.toml"
    cfg.write_text(config.to_toml())
    port = free_port()
    log = tmp / "serve.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ppstage.cli", "serve", "--config", str(cfg), "--port", str(port),
             "--out", str(tmp / "ranks"), *args],
            stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )
    svc = ServiceProc(proc, f"http://127.0.0.1:{port}", tmp / "ranks", log)
    try:
        asyncio.run(wait_ready(svc, ready_timeout))
    except BaseException:
        svc.stop(5.0)
        raise
    return svc


async def wait_ready(svc: ServiceProc, timeout: float) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < end:
            if not svc.alive():
                raise AssertionError(f"serve exited with {svc.proc.returncode}\n{svc.output()}")
            try:
                async with http.get(svc.url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise AssertionError(f"service not ready within {timeout}s\n{svc.output()}")


async def metric(http: aiohttp.ClientSession, url: str, name: str, labels: str = "") -> float | None:
    """One sample of ``/metrics`` (``name{labels}``), or None if absent."""
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return None
