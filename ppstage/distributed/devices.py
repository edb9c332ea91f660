"""Which device a rank's tensors live on, and the CUDA plumbing that is a no-op on CPU.

``runtime.device`` (parity-checked) says where: ``auto`` = ``cpu`` on gloo and
``cuda:<local rank>`` on NCCL; ``cuda`` = ``cuda:<local rank>``; ``cpu`` = CPU
(refused with NCCL, which moves device memory only).

Where they cross devices:

- the transport's threads send and receive on the rank's device, each on a
  CUDA stream of its own (``comm_stream``): a tensor made on the compute stream
  is waited for before it is sent (``before_send``), and a received frame is
  complete on its stream before the loop sees it (``after_receive``);
- the generator (``build_generator(..., device=)``) lives on the rank's device,
  where the transport delivers inbound tensors, so nothing is moved in between;
  its weights and noise are drawn on the CPU and moved, so their bytes do not
  depend on the device;
- rank 0 copies each result to the host through a pinned buffer (``HostStage``)
  for its decode path and the output sink: stage 0 (text encoder, VAE) runs on
  the host, and envelopes are built there;
- the reference pipeline of a bitwise check runs its generator on the generator
  ranks' device (``reference_device``): CPU and GPU results differ in the last bits.

On CPU every helper here returns its input or does nothing, so CPU runs (and
the tests) go through the same code.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from ppstage.config import ConfigError, PPStageConfig

def local_rank(default: int) -> int:
    """``LOCAL_RANK`` as torchrun (or ``ppstage demo``) sets it, else ``default``."""
    try:
        return int(os.environ.get("LOCAL_RANK", default))
    except ValueError:
        return default


def resolve_device(config: PPStageConfig, local: int) -> torch.device:
    """The device of this rank's transport and buffers (see the module docstring)."""
    want, backend = config.runtime.device, config.topology.backend
    if want == "cpu" and backend == "nccl":
        raise ConfigError("runtime.device = cpu cannot work with backend nccl (NCCL sends device memory)")
    if want == "cuda" or (want == "auto" and backend == "nccl"):
        if torch.cuda.is_available() and local >= torch.cuda.device_count():
            # NCCL refuses two ranks of one communicator on one GPU: one GPU per rank.
            raise ConfigError(f"local rank {local} needs cuda:{local}, this host has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", local)
    return torch.device("cpu")


def require_device(config: PPStageConfig, local: int) -> torch.device:
    """``resolve_device``, refusing (``ConfigError``) a CUDA device this torch cannot use.

    Called by ``demo`` and ``launch`` before anything starts, so that CUDA asked
    for on a CPU-only build (or a host without a GPU) is one line and exit 2,
    not a traceback on every rank at ``torch.cuda.set_device``.
    """
    device = resolve_device(config, local)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no usable GPU on this host"
        raise ConfigError(
            f"runtime.device = {config.runtime.device!r} with backend {config.topology.backend} needs CUDA, "
            f"and this torch ({torch.__version__}) has {why}; use backend gloo with device auto or cpu"
        )
    return device


def reference_device(config: PPStageConfig) -> torch.device:
    """Where a reference run must put its generator to match this config's ranks bitwise.

    The device of generator rank 1 (local rank 1 under ``ppstage demo``): every
    generator rank resolves ``runtime.device`` the same way, and the same kernels on the
    same kind of device give the same bytes. On gloo that is the CPU.
    """
    return resolve_device(config, 1)


def comm_stream(device: torch.device) -> "torch.cuda.Stream | None":
    """A CUDA stream for one communication thread; None on CPU."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


@contextlib.contextmanager
def on_stream(stream: "torch.cuda.Stream | None") -> Iterator[None]:
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def before_send(stream: "torch.cuda.Stream | None", tensors) -> None:
    """Order a send after the work that produced ``tensors`` on the compute stream."""
    if stream is None:
        return
    stream.wait_stream(torch.cuda.default_stream(stream.device))
    for t in tensors:
        if t.device.type == "cuda":
            t.record_stream(stream)  # the allocator must not reuse it before the send ends


def after_receive(stream: "torch.cuda.Stream | None", tensors) -> None:
    """Make received ``tensors`` safe to use on any stream before they leave the thread."""
    if stream is None:
        return
    stream.synchronize()
    compute = torch.cuda.default_stream(stream.device)
    for t in tensors:
        if t.device.type == "cuda":
            t.record_stream(compute)


class HostStage:
    """Rank 0's copy of results to the host: through a pinned buffer on CUDA, a no-op on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        key = (t.dtype, tuple(t.shape))
        buf = self._pinned.get(key)
        if buf is None:
            buf = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return buf.clone()  # the pinned buffer is reused for the next result
