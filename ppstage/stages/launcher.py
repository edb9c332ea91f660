"""Start a local pipeline: one ``ppstage launch`` process per rank, reaped always.

Used by ``ppstage demo`` and by the multi-process tests. Each rank gets the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
with a free port chosen at run time. Rank 0's stdout (progress lines) can be
passed through; every rank's stderr (its structured log) goes to
``<out>/rank<r>.log``.
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


from ppstage.config import PPStageConfig


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

    def signal_rank0(self, sig: int = signal.SIGTERM) -> None:
        if self.procs[0].poll() is None:
            self.procs[0].send_signal(sig)

    def wait(self, timeout_s: float, *, grace_s: float = 15.0) -> list[int | None]:
        """Wait for every rank; once one fails, the rest get ``grace_s`` to exit on their own.

        Ranks still alive at the end are killed (reported as ``None``): nothing
        is ever leaked, and a hang shows up as ``None`` rather than as a hang.
        """
        end = time.monotonic() + timeout_s
        first_failure: float | None = None
        while time.monotonic() < end:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = time.monotonic()
                end = min(end, first_failure + grace_s)
            time.sleep(0.05)
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
    chunks: int,
    launch_args: list[str] = (),  # type: ignore[assignment]
    passthrough_stdout: bool = False,
    env_overrides: dict[int, dict[str, str]] | None = None,
    config_overrides: dict[int, PPStageConfig] | None = None,
) -> Pipeline:
    """Spawn ``1 + stages * tp`` processes running ``ppstage launch``.

    ``config_overrides`` gives a rank a different config (tests of the parity
    handshake); ``env_overrides`` adds environment variables per rank.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = config.topology.world_size
    port = free_port()
    summary = out / "summary.json"
    summary.unlink(missing_ok=True)
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
            cmd = [
                sys.executable, "-m", "ppstage.cli", "launch",
                "--config", str(cfg_path), "--chunks", str(chunks), *launch_args,
            ]
            if rank == 0:
                cmd += ["--summary-out", str(summary), "--latents-out", str(out / "latents")]
            stdout = None if (rank == 0 and passthrough_stdout) else subprocess.DEVNULL
            with open(out / f"rank{rank}.log", "wb") as log_file:
                procs.append(subprocess.Popen(cmd, env=env, stdout=stdout, stderr=log_file))
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    return Pipeline(procs, out, summary)
