"""The service's pure parts and its refusals to start (no pipeline needed).

The announced boundary of a live intent must be where the planner applies
it; frame messages round-trip; a viewer's queue is bounded and a slow viewer
is kicked; a stale epoch never reaches a viewer; R0 without a passing quality
report, and a non-loopback bind without a token, refuse to start.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from ppstage.config import PPStageConfig
from ppstage.core.planner import (
    AttentionBiasChange,
    HardCut,
    Planner,
    PromptUpdate,
    StepListChange,
    StreamStart,
)
from ppstage.service.frames import FrameHeader, FrameHub, Viewer, encode_chunk, pack_frame, unpack_frame
from ppstage.service.metrics import ServiceMetrics
from ppstage.service.schemas import BadRequest, ParamsRequest, PromptRequest, decode_body, field_of


@pytest.mark.parametrize("seed", range(5))
def test_next_boundary_is_where_the_next_plan_lands(seed):
    # A small positional table so forced cuts happen too.
    cfg = PPStageConfig().with_overrides({"model.rope_max_frames": 12})
    planner = Planner(cfg)
    rng = random.Random(seed)
    planner.submit(StreamStart("a"))
    for _ in range(60):
        for _ in range(rng.randrange(3)):
            planner.submit(rng.choice([
                HardCut(), PromptUpdate("b"), AttentionBiasChange(0.5), StepListChange((1000, 400)),
            ]))
        announced = planner.next_boundary()
        plan = planner.next_chunk()
        assert announced == (plan.chunk_index, plan.cache_epoch)


def test_frame_messages_round_trip_and_encode_both_formats():
    pixels = torch.randint(0, 256, (3, 3, 16, 24), dtype=torch.uint8)
    images = encode_chunk(pixels, frozenset({"jpeg", "png"}), 85)
    assert [len(images[f]) for f in ("jpeg", "png")] == [3, 3]
    assert images["jpeg"][0][:2] == b"\xff\xd8" and images["png"][0][:4] == b"\x89PNG"
    header = FrameHeader(restart_generation=1, cache_epoch=2, chunk_index=7, call_id=9, frame=1,
                         stream_frame=4, width=24, height=16, format="png")
    got, image = unpack_frame(pack_frame(header, images["png"][1]))
    assert got == header and image == images["png"][1]
    with pytest.raises(ValueError):
        unpack_frame(b"\x00\x00\x01\x00{}")


def test_viewer_queue_is_bounded_drops_oldest_and_kicks_after_the_limit():
    v = Viewer(0, "jpeg", queue_frames=3, drop_limit=4)
    lost = [v.offer(0, bytes([i])) for i in range(6)]
    assert lost == [0, 0, 0, 1, 1, 1] and [m for _, m in v.queue] == [b"\x03", b"\x04", b"\x05"]
    assert v.kicked is None
    v.offer(0, b"x")
    assert v.kicked == "slow" and v.gone.is_set()


async def test_a_stale_epoch_never_reaches_a_viewer():
    metrics = ServiceMetrics()
    epoch = [0]
    cfg = PPStageConfig().service
    hub = FrameHub(cfg, metrics, current_epoch=lambda: epoch[0], restart_generation=0)
    viewer = hub.attach("png")
    viewer.offer(0, b"old-epoch-frame")
    sent: list[bytes] = []

    async def send(message: bytes) -> None:
        sent.append(message)
        viewer.kick("done")

    epoch[0] = 1  # a hard cut moved rank 0's gate before the frame went out
    viewer.offer(1, b"new-epoch-frame")
    assert await hub.pump(viewer, send) == "done"
    assert sent == [b"new-epoch-frame"]
    hub.detach(viewer, "done")
    await hub.close()


@pytest.mark.parametrize(
    ("body", "type_", "status", "field"),
    [
        (b'{"prompt": 1}', PromptRequest, 422, "prompt"),
        (b'{"prompt": "a", "extra": 1}', PromptRequest, 422, "extra"),
        (b'{"step_list": [1000, 2000]}', ParamsRequest, 422, "step_list[1]"),
        (b"{", PromptRequest, 400, None),
    ],
)
def test_request_bodies_name_the_bad_field(body, type_, status, field):
    with pytest.raises(BadRequest) as info:
        decode_body(body, type_)
    assert (info.value.status, info.value.field) == (status, field)


def test_field_of_reads_msgspec_messages():
    assert field_of("Expected `str`, got `int` - at `$.prompt`") == "prompt"
    assert field_of("Object missing required field `prompt`") == "prompt"
    assert field_of("Expected `object`, got `array`") is None


def _serve(tmp_path, cfg: PPStageConfig, *args: str, env=None) -> subprocess.CompletedProcess:
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    return subprocess.run(
        [sys.executable, "-m", "ppstage.cli", "serve", "--config", str(path), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_r0_without_a_passing_report_refuses_to_start(tmp_path):
    r = _serve(tmp_path, PPStageConfig().with_overrides({"recompute.mode": "r0"}))
    assert r.returncode == 2
    assert "r0_quality_report" in r.stderr and "ppstage quality" in r.stderr


def test_r0_with_a_report_for_another_config_refuses_to_start(tmp_path):
    from ppstage.model.quality import run_quality, write_report

    other = PPStageConfig().with_overrides({"denoise.base_seed": 7})
    report = run_quality(other, chunks=2, threshold_db=0.0)
    write_report(tmp_path / "q.json", report)
    r = _serve(tmp_path, PPStageConfig().with_overrides({"recompute.mode": "r0"}),
               "--r0-quality-report", str(tmp_path / "q.json"))
    assert r.returncode == 2 and "different model or config" in r.stderr


def test_a_non_loopback_bind_without_a_token_refuses_to_start(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "PPSTAGE_API_TOKEN"}
    r = _serve(tmp_path, PPStageConfig(), "--host", "0.0.0.0", env=env)
    assert r.returncode == 2 and "token" in r.stderr
