"""Run a test scenario on N real processes (gloo on loopback), always reaping them.

``run_ranks("test_transport:_roundtrip_worker", 2, args={...})`` starts one
``python tests/dist_helpers.py`` child per rank. Each child imports the named
module from ``tests/`` (torch is imported once per process), calls the function
with a ``RankContext`` and writes its JSON-able return value to a file. The
parent waits with a deadline and kills every child still alive in ``finally``,
so a hung scenario fails the test instead of leaking processes. A child that
has returned waits (on its stdin) until every rank has returned or died, so
rank 0, which hosts the store, never leaves while others still use it.

Workers usually start with ``ctx.init(config)``: the default process group on
a port chosen at run time (bind to port 0).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppstage.stages.launcher import free_port

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


@dataclass
class RankContext:
    """What a worker function receives in its process."""

    rank: int
    world_size: int
    port: int
    args: dict[str, Any] = field(default_factory=dict)
    linger: bool = True  # False: exit as soon as the worker returns, not with the others

    def init(self, config) -> None:
        """Initialise the default process group (gloo, loopback, config timeout)."""
        from ppstage.distributed.transport import init_process_group

        init_process_group(config, self.rank, self.world_size, "127.0.0.1", self.port)


@dataclass
class RankOutcome:
    rank: int
    returncode: int
    result: Any
    output: str  # stdout + stderr of the child, for failure messages


class RanksFailed(AssertionError):
    """A child exited non-zero, or the scenario ran past its deadline."""


def run_ranks(
    target: str,
    world_size: int,
    *,
    args: dict[str, Any] | None = None,
    timeout: float = 30.0,
    expect_ok: bool = True,
) -> list[RankOutcome]:
    """Run ``target`` ("module:function" in tests/) on ``world_size`` processes.

    Returns one ``RankOutcome`` per rank. With ``expect_ok`` a child exiting
    non-zero raises ``RanksFailed`` with every child's output. Exceeding
    ``timeout`` always raises ``RanksFailed`` (after killing the children).
    """
    port = free_port()
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")]),
    )
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    payload = json.dumps(args or {})
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="ppstage-dist-") as tmp:
        tmpdir = Path(tmp)
        logs = [open(tmpdir / f"rank{r}.log", "wb") for r in range(world_size)]
        try:
            for rank in range(world_size):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            target,
                            str(rank),
                            str(world_size),
                            str(port),
                            payload,
                            str(tmpdir / f"rank{rank}.json"),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=logs[rank],
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=str(REPO_ROOT),
                    )
                )
            deadline = time.monotonic() + timeout
            released = False
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    _kill_all(procs)
                    raise RanksFailed(
                        f"{target} ran past {timeout}s\n" + _outputs(tmpdir, world_size)
                    )
                if not released and all(
                    p.poll() is not None or (tmpdir / f"rank{r}.json").exists()
                    for r, p in enumerate(procs)
                ):
                    # Every rank has its result: let them exit together. Rank 0
                    # hosts the store, so it must not leave while others still
                    # create groups through it.
                    for p in procs:
                        _release(p)
                    released = True
                time.sleep(0.01)
        finally:
            _kill_all(procs)
            for f in logs:
                f.close()
        outcomes = []
        for rank, p in enumerate(procs):
            result_path = tmpdir / f"rank{rank}.json"
            result = json.loads(result_path.read_text()) if result_path.exists() else None
            output = (tmpdir / f"rank{rank}.log").read_text(errors="replace")
            outcomes.append(RankOutcome(rank, p.returncode, result, output))
        if expect_ok and any(o.returncode != 0 for o in outcomes):
            raise RanksFailed(f"{target}: a rank failed\n" + _outputs(tmpdir, world_size, outcomes))
        return outcomes


def _release(p: subprocess.Popen) -> None:
    try:
        p.stdin.close()
    except OSError:  # the child is gone already
        pass


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
            pass
        _release(p)


def _outputs(tmpdir: Path, world_size: int, outcomes: list[RankOutcome] | None = None) -> str:
    parts = []
    for rank in range(world_size):
        path = tmpdir / f"rank{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        rc = f" rc={outcomes[rank].returncode}" if outcomes else ""
        parts.append(f"--- rank {rank}{rc} ---\n{text[-4000:]}")
    return "\n".join(parts)


def _child_main(argv: list[str]) -> int:
    target, rank, world_size, port, payload, result_path = argv
    module_name, _, func_name = target.partition(":")
    # Die with the parent: a child must never outlive the test that started it.
    _exit_with_parent()
    import importlib

    module = importlib.import_module(module_name)
    ctx = RankContext(int(rank), int(world_size), int(port), json.loads(payload))
    try:
        result = getattr(module, func_name)(ctx)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    partial = Path(result_path + ".part")
    partial.write_text(json.dumps(result))
    partial.rename(result_path)  # atomic: the parent never reads half a result
    sys.stdout.flush()
    sys.stderr.flush()
    if ctx.linger:
        sys.stdin.buffer.read()  # wait for the parent: every rank is done
    # os._exit: receiver threads may still be blocked in gloo; no interpreter
    # teardown, no destroy_process_group (which aborts under a blocked receive).
    os._exit(0)


def _exit_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:  # pragma: no cover
            pass


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
