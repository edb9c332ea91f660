"""Device selection from the config, and the CUDA plumbing that must be a no-op on CPU."""

from __future__ import annotations

import pytest
import torch

from ppstage.config import ConfigError, PPStageConfig
from ppstage.distributed.devices import (
    HostStage,
    after_receive,
    before_send,
    comm_stream,
    local_rank,
    on_stream,
    resolve_device,
)


def _config(device: str, backend: str) -> PPStageConfig:
    return PPStageConfig().with_overrides({"runtime.device": device, "topology.backend": backend})


@pytest.mark.parametrize(
    "device, backend, want",
    [("auto", "gloo", "cpu"), ("auto", "nccl", "cuda:3"), ("cuda", "gloo", "cuda:3"), ("cpu", "gloo", "cpu")],
)
def test_the_device_follows_the_config_and_the_local_rank(device, backend, want):
    assert resolve_device(_config(device, backend), 3) == torch.device(want)


def test_cpu_tensors_with_nccl_are_refused_up_front():
    with pytest.raises(ConfigError, match="nccl"):
        resolve_device(_config("cpu", "nccl"), 0)


def test_an_unknown_device_name_is_a_config_error():
    with pytest.raises(ConfigError, match="runtime.device"):
        PPStageConfig().with_overrides({"runtime.device": "gpu"})


def test_local_rank_comes_from_torchrun_else_the_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_rank(5) == 5
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert local_rank(5) == 2


def test_on_cpu_the_stream_helpers_are_no_ops_and_results_stay_where_they_are():
    cpu = torch.device("cpu")
    stream = comm_stream(cpu)
    assert stream is None
    t = torch.arange(6.0)
    with on_stream(stream):
        before_send(stream, [t])
        after_receive(stream, [t])
    assert HostStage(cpu).to_host(t) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_result_reaches_the_host_through_the_pinned_buffer_intact():  # pragma: no cover - GPU only
    dev = torch.device("cuda", 0)
    t = torch.randn(3, 4, 8, 8, device=dev)
    host = HostStage(dev)
    first = host.to_host(t)
    second = host.to_host(t * 2)
    assert first.device.type == "cpu" and torch.equal(first, t.cpu()) and torch.equal(second, (t * 2).cpu())
