"""``ppstage serve`` under a real torchrun agent: restart generations and a dead launcher.

One run (c10d rendezvous on 127.0.0.1, ``--max-restarts 1``) of an R0 config
started with ``--force-unvalidated``: the warning shows in status and metrics;
killing a stage makes the agent restart the job, which comes back as
restart generation 1 starting with a hard cut; killing the agent (SIGKILL, so
it cannot stop its workers) ends every worker within the launcher watch window.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from service_helpers import ServiceProc, metric, service_config, wait_ready

from ppstage.distributed.supervision import LAUNCHER_WINDOW_S
from ppstage.stages.launcher import free_port

pytestmark = pytest.mark.timeout(240)

# The window is a bound on the watch itself; on a busy 2-core CI machine a
# process may take a few seconds more to be scheduled and torn down.
EXIT_SLACK_S = 8.0


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def status(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/status") as r:
            return await r.json()


async def wait_generation(svc: ServiceProc, generation: int, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            st = await status(svc.url)
            if st["restart_generation"] == generation and st["ready"]:
                return st
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.3)
    raise AssertionError(f"generation {generation} never became ready\n{svc.output()}")


async def test_restart_generation_and_a_dead_agent_under_torchrun(tmp_path):
    config = service_config(**{"recompute.mode": "r0", "runtime.drain_deadline_s": 4.0})
    cfg = tmp_path / "r0.toml"
    cfg.write_text(config.to_toml())
    port = free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        torchrun, "--nnodes", "1", "--nproc-per-node", str(config.topology.world_size),
        "--max-restarts", "1", "--monitor-interval", "0.2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "-m", "ppstage.cli", "serve", "--config", str(cfg), "--port", str(port), "--force-unvalidated",
    ]
    log = tmp_path / "torchrun.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    with open(log, "wb") as f:
        # cwd: a failing rank's flight record lands in the test's directory, never the checkout.
        agent = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                 cwd=tmp_path)
    svc = ServiceProc(agent, f"http://127.0.0.1:{port}", tmp_path, log)
    try:
        await wait_ready(svc, 120)
        st = await wait_generation(svc, 0, 30)
        assert st["unvalidated"] and "WITHOUT a passing quality report" in st["warnings"][0]
        async with aiohttp.ClientSession() as http:
            assert await metric(http, svc.url, "ppstage_unvalidated") == 1.0
            assert await metric(http, svc.url, "ppstage_restart_generation") == 0.0

        # A stage dies: the agent restarts the whole job as generation 1, with a hard cut.
        workers = {rank_of(p): p for p in children(agent.pid)}
        assert sorted(workers) == [0, 1, 2], workers
        os.kill(workers[2], signal.SIGKILL)
        st = await wait_generation(svc, 1, 150)
        assert st["cache_epoch"] == 0 and st["chunk_index"] is not None
        assert "generation" not in st["warnings"]  # the warning stays the R0 one
        assert st["unvalidated"]

        # The agent dies without a chance to stop its workers: they must not stream on unsupervised.
        workers = children(agent.pid)
        assert len(workers) == 3
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        t0 = time.monotonic()
        while any(alive(p) for p in workers):
            waited = time.monotonic() - t0
            assert waited < LAUNCHER_WINDOW_S + EXIT_SLACK_S, f"workers alive {waited:.1f}s after the agent died"
            await asyncio.sleep(0.05)
        text = log.read_text(errors="replace")
        assert '"restart_generation": 1' in text and "launcher gone" in text, text[-3000:]
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.wait()


async def test_two_node_launch_serves_and_a_dead_agent_ends_every_worker(tmp_path):
    """Two torchrun agents (--nnodes 2, c10d on 127.0.0.1): node A hosts ranks 0-1, node B rank 2.

    c10d orders nodes by --local-addr, so "127.0.0.1" (A) hosts global rank 0
    before "localhost" (B). Killing B's agent ends B's worker through the
    launcher watch, and A's workers through their watchdogs.
    """
    config = service_config(**{"runtime.stage_idle_deadline_s": 4.0, "runtime.keepalive_interval_s": 0.5,
                               "runtime.result_deadline_min_s": 4.0})
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(config.to_toml())
    port, rdzv = free_port(), free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    agents: list[subprocess.Popen] = []
    for local_addr, nproc in (("127.0.0.1", 2), ("localhost", 1)):
        cmd = [
            torchrun, "--nnodes", "2", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "--rdzv-id", "two-node-test",
            "--local-addr", local_addr, "--monitor-interval", "0.2",
            "-m", "ppstage.cli", "serve", "--config", str(cfg), "--port", str(port),
        ]
        log = open(tmp_path / f"agent-{local_addr}.log", "wb")
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       cwd=tmp_path))
        log.close()
    svc = ServiceProc(agents[0], f"http://127.0.0.1:{port}", tmp_path, tmp_path / "agent-127.0.0.1.log")
    try:
        await wait_ready(svc, 120)
        st = await status(svc.url)
        assert st["topology"]["world_size"] == 3 and st["chunks_emitted"] > 0
        node_a = {rank_of(p): p for p in children(agents[0].pid)}
        node_b = {rank_of(p): p for p in children(agents[1].pid)}
        assert sorted(node_a) == [0, 1] and sorted(node_b) == [2], (node_a, node_b)

        os.kill(agents[1].pid, signal.SIGKILL)
        agents[1].wait()
        t0 = time.monotonic()
        pending = {**{f"B{r}": p for r, p in node_b.items()}, **{f"A{r}": p for r, p in node_a.items()}}
        gone_at: dict[str, float] = {}
        while len(gone_at) < len(pending):
            for name, pid in pending.items():
                if name not in gone_at and not alive(pid):
                    gone_at[name] = time.monotonic() - t0
            assert time.monotonic() - t0 < 30, f"still alive after 30 s: {set(pending) - set(gone_at)}"
            await asyncio.sleep(0.05)
        assert gone_at["B2"] < LAUNCHER_WINDOW_S + EXIT_SLACK_S, gone_at
        watchdog = config.runtime.stage_idle_deadline_s + config.runtime.result_deadline_min_s
        assert max(gone_at.values()) < watchdog + EXIT_SLACK_S, gone_at
        assert agents[0].wait(30) != 0  # node A's agent reports the failed job
        print("exit times after the agent was killed (s):", {k: round(v, 2) for k, v in sorted(gone_at.items())})
    finally:
        for agent in agents:
            try:
                os.killpg(agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            agent.wait()
