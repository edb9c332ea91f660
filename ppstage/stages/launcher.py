"""Start a local pipeline: one ``ppstage launch`` process per rank, reaped always.

Used by ``ppstage demo`` and by the multi-process tests. Each rank gets the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
with a free port chosen at run time. Rank 0's stdout (progress lines) can be
passed through; every rank's stderr (its structured log) goes to
``<out>/rank<r>.log``. Rank 0 appends one JSON line per finished chunk to
``<out>/chunks.jsonl`` (``Pipeline.chunk_records``: what the digest check
reads, at any run length) and, only when asked, each emitted chunk's
latents to ``<out>/latents/`` (the tolerance check of tensor parallelism).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


from ppstage.config import PPStageConfig
from ppstage.stages.stop import spawn_blocked


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pipeline:
    """A running local pipeline (``start_pipeline``); ``wait`` reaps every process."""

    procs: list[subprocess.Popen]
    out_dir: Path
    summary_path: Path
    exit_codes: list[int | None] = field(default_factory=list)
    timed_out: bool = False  # ``wait`` gave up at its deadline and killed the ranks still running

    def signal_rank0(self, sig: int = signal.SIGTERM) -> None:
        if self.procs[0].poll() is None:
            self.procs[0].send_signal(sig)

    def stop(self) -> None:
        """SIGTERM to every rank still running, as torchrun forwards it and as Ctrl-C reaches them.

        Rank 0 drains and sends SHUTDOWN; the others wait for it within
        ``runtime.drain_deadline_s``. Every rank has its handler from its first
        moment (``ppstage.stages.stop``), so a stop during start-up is not a kill.
        Idempotent: a second stop changes nothing.
        """
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def wait(
        self,
        timeout_s: float | None,
        *,
        grace_s: float = 15.0,
        on_tick: Callable[[], None] | None = None,
        tick_s: float = 0.05,
    ) -> list[int | None]:
        """Wait for every rank; once one fails, the rest get ``grace_s`` to exit on their own.

        ``timeout_s=None`` waits as long as the ranks run. Ranks still alive at
        the end are killed (reported as ``None``, and ``timed_out`` is set when
        the deadline was the reason): nothing is ever leaked, and a hang shows
        up as ``None`` rather than as a hang. ``on_tick`` runs every ``tick_s``
        while waiting (a progress display).
        """
        end = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
        first_failure: float | None = None
        self.timed_out = False
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if time.monotonic() >= end:
                self.timed_out = first_failure is None
                break
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = time.monotonic()
                end = min(end, first_failure + grace_s)
            if on_tick is not None:
                on_tick()
            time.sleep(tick_s)
        self.exit_codes = []
        for p in self.procs:
            code = p.poll()
            if code is None:
                p.kill()
                p.wait()
            self.exit_codes.append(code)
        return self.exit_codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def summary(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            return None

    def chunk_records(self) -> list[dict[str, Any]]:
        """Rank 0's chunk stream: one dict per chunk whose outcome is final, in the order they ended."""
        try:
            text = (self.out_dir / "chunks.jsonl").read_text()
        except OSError:
            return []
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                break
        return records

    def latents(self, chunk_index: int) -> "torch.Tensor | None":
        """Rank 0's ``latents_out`` of an emitted chunk (raw float32, shape from the config)."""
        import torch

        path = self.out_dir / "latents" / f"chunk{chunk_index}.f32"
        try:
            return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32)
        except OSError:
            return None

    def log_tail(self, rank: int, lines: int = 20) -> str:
        try:
            return "\n".join((self.out_dir / f"rank{rank}.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""


def start_pipeline(
    config: PPStageConfig,
    out_dir: str | Path,
    *,
    chunks: int | None,
    launch_args: list[str] = (),  # type: ignore[assignment]
    passthrough_stdout: bool = False,
    write_latents: bool = True,
    env_overrides: dict[int, dict[str, str]] | None = None,
    config_overrides: dict[int, PPStageConfig] | None = None,
    command: str = "launch",
) -> Pipeline:
    """Spawn ``1 + stages * tp`` processes running ``ppstage launch`` (or ``command``).

    ``command="serve"`` with ``chunks=None`` starts a service: rank 0 serves the
    HTTP API and the stream runs until rank 0 gets SIGTERM.
    ``config_overrides`` gives a rank a different config (tests of the parity
    handshake); ``env_overrides`` adds environment variables per rank.
    ``write_latents`` makes rank 0 write every emitted chunk's latents to
    ``<out>/latents`` (only the tensor-parallel tolerance check needs them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = config.topology.world_size
    port = free_port()
    summary = out / "summary.json"
    summary.unlink(missing_ok=True)
    (out / "chunks.jsonl").unlink(missing_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world):
            cfg = (config_overrides or {}).get(rank, config)
            cfg_path = out / f"config.rank{rank}.toml"
            cfg_path.write_text(cfg.to_toml())
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "PPSTAGE_LAUNCHER_PID": str(os.getpid()),  # ranks exit if this process dies (B17)
                **(env_overrides or {}).get(rank, {}),
            }
            cmd = [sys.executable, "-m", "ppstage.cli", command, "--config", str(cfg_path), "--flight-dir", str(out), *launch_args]
            if chunks is not None:
                cmd += ["--chunks", str(chunks)]
            if rank == 0:
                cmd += ["--summary-out", str(summary)]
                if command == "launch":
                    cmd += ["--chunks-out", str(out / "chunks.jsonl")]
                if command == "launch" and write_latents:
                    cmd += ["--latents-out", str(out / "latents")]
            stdout = None if (rank == 0 and passthrough_stdout) else subprocess.DEVNULL
            with open(out / f"rank{rank}.log", "wb") as log_file, spawn_blocked():
                procs.append(subprocess.Popen(cmd, env=env, stdout=stdout, stderr=log_file))
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    return Pipeline(procs, out, summary)
