"""Stage-0 inputs and the single-process reference pipeline (R1 / R0a / R0)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from ppstage.cli import main
from ppstage.config import PPStageConfig
from ppstage.model import tensor_digest
from ppstage.core.planner import HardCut, Planner, StreamStart
from ppstage.model.reference import StreamScript, contact_sheet, run_reference, write_png
from ppstage.model.stream_inputs import ContextUnavailable, StaleInputs, StreamInputs


def cfg(mode: str) -> PPStageConfig:
    return PPStageConfig().with_overrides({"recompute.mode": mode})


def fake_latents(plan) -> torch.Tensor:
    return torch.full((3, 4, 8, 8), float(plan.current_start_frame)) + torch.arange(3.0).view(3, 1, 1, 1)


def feed(stream: StreamInputs, planner: Planner, chunks: int, decode: bool = True):
    plan = None
    for _ in range(chunks):
        plan = planner.next_chunk()
        stream.chunk_inputs(plan)
        stream.record_latents(plan, fake_latents(plan))
        if decode:
            stream.decode(plan, fake_latents(plan))
    return plan


def planner_for(config: PPStageConfig) -> Planner:
    p = Planner(config)
    p.submit(StreamStart("a fox"))
    return p


def test_chunk_inputs_carry_context_only_when_recomputing():
    config = cfg("r0a")
    stream, planner = StreamInputs(config), planner_for(config)
    first = planner.next_chunk()
    inputs = stream.chunk_inputs(first)
    assert inputs.context_frames is None
    assert inputs.latents_in.shape == (3, 4, 8, 8)
    assert inputs.conditioning.shape == (8, 32)
    assert inputs.step_list.dtype == torch.int64 and inputs.step_list.tolist() == [1000, 750, 500, 250]


def test_early_context_is_the_epochs_first_frame_plus_the_latest_latents():
    config = cfg("r0a")
    stream, planner = StreamInputs(config), planner_for(config)
    first = feed(stream, planner, 1, decode=False)  # the early regime never waits for a decode
    plan = planner.next_chunk()
    assert plan.context_source == "early" and plan.context_frame_indices == (0, 1, 2)
    assert stream.anchor_ready(plan)
    assert torch.equal(stream.chunk_inputs(plan).context_frames, fake_latents(first))


def test_decoded_context_is_the_vae_round_trip_of_the_decoded_anchor():
    config = cfg("r0a")
    stream, planner = StreamInputs(config), planner_for(config)
    prev = feed(stream, planner, 2)
    plan = planner.next_chunk()
    assert plan.context_source == "decoded" and plan.context_frame_indices == (0, 4, 5)
    ctx = stream.chunk_inputs(plan).context_frames
    pixels = stream.decoded_frame_buffer[0]
    assert torch.equal(ctx[0], stream.backend.vae_encode(pixels[None])[0])
    assert not torch.equal(ctx[0], torch.zeros(4, 8, 8))  # frame 0's latent is all zeros: lossy
    assert torch.equal(ctx[1:], fake_latents(prev)[1:])


def test_latent_context_uses_the_latent_anchor():
    config = cfg("r0")
    stream, planner = StreamInputs(config), planner_for(config)
    feed(stream, planner, 3, decode=False)  # R0 never needs a decode
    plan = planner.next_chunk()
    assert plan.context_source == "latent" and plan.context_frame_indices == (3, 7, 8)
    assert stream.anchor_ready(plan)
    ctx = stream.chunk_inputs(plan).context_frames
    assert torch.equal(ctx[0], torch.full((4, 8, 8), 3.0))


def test_the_decoded_anchor_is_awaited_and_missing_frames_raise():
    config = cfg("r0a")
    stream, planner = StreamInputs(config), planner_for(config)
    feed(stream, planner, 2, decode=False)
    plan = planner.next_chunk()
    assert not stream.anchor_ready(plan)
    with pytest.raises(ContextUnavailable) as info:
        stream.chunk_inputs(plan)
    assert info.value.chunk_index == plan.chunk_index


def test_decoded_buffer_keeps_the_newest_frames():
    config = cfg("r0a")
    stream, planner = StreamInputs(config), planner_for(config)
    feed(stream, planner, 4)
    assert list(stream.decoded_frame_buffer) == list(range(6, 12))


def test_a_hard_cut_clears_the_old_epoch_and_old_results_are_refused():
    config = cfg("r0a")
    stream, planner = StreamInputs(config), planner_for(config)
    old = feed(stream, planner, 3)
    planner.submit(HardCut())
    cut = planner.next_chunk()
    stream.chunk_inputs(cut)
    assert stream.decoded_frame_buffer == {} and stream.latent_frames() == ()
    with pytest.raises(StaleInputs):
        stream.decode(old, fake_latents(old))


@pytest.mark.parametrize("mode,calls", [("r1", [4, 4, 4, 4]), ("r0a", [4, 5, 5, 5]), ("r0", [4, 5, 5, 5])])
def test_reference_runs_every_planned_generator_call(mode, calls):
    records = run_reference(cfg(mode), 4)
    assert [r.generator_calls for r in records] == calls
    for r in records:
        assert r.output_digest == tensor_digest(r.latents_out)
        assert r.pixels.shape == (3, 3, 64, 64) and r.pixels.dtype == torch.uint8
    assert len({r.state_digest for r in records}) == 4


def test_reference_follows_the_script_across_cuts_and_prompt_updates():
    script = StreamScript(prompt="a fox", cut_at=(3,), prompt_at={2: "a whale"})
    records = run_reference(cfg("r0a"), 5, script)
    assert [r.cache_epoch for r in records] == [0, 0, 0, 1, 1]
    assert [r.current_start_frame for r in records] == [0, 3, 6, 0, 3]
    plain = run_reference(cfg("r0a"), 2, StreamScript(prompt="a fox"))
    assert [r.output_digest for r in records[:2]] == [r.output_digest for r in plain]
    assert records[2].output_digest != run_reference(cfg("r0a"), 3, StreamScript(prompt="a fox"))[2].output_digest


def _read_png(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    return w, h, zlib.decompress(chunks[b"IDAT"])


def test_png_writer_round_trips_pixels(tmp_path):
    img = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    write_png(tmp_path / "x.png", img)
    w, h, raw = _read_png((tmp_path / "x.png").read_bytes())
    assert (w, h) == (7, 5)
    rows = [raw[i * (1 + 21) : (i + 1) * (1 + 21)] for i in range(5)]
    assert all(r[0] == 0 for r in rows)
    assert b"".join(r[1:] for r in rows) == img.numpy().tobytes()


def test_reference_command_writes_digests_and_a_contact_sheet(tmp_path, capsys):
    out = tmp_path / "ref"
    rc = main(["reference", "--chunks", "4", "--mode", "r0a", "--cut-at", "3",
               "--prompt-at", "2:a whale", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "digests.json").read_text())
    assert doc["mode"] == "r0a" and doc["config_digest"] == cfg("r0a").digest()
    assert [c["cache_epoch"] for c in doc["chunks"]] == [0, 0, 0, 1]
    script = StreamScript(prompt="a red fox running through snow", cut_at=(3,), prompt_at={2: "a whale"})
    expected = run_reference(cfg("r0a"), 4, script)
    assert [c["output_digest"] for c in doc["chunks"]] == [r.output_digest for r in expected]
    w, h, _ = _read_png((out / "contact_sheet.png").read_bytes())
    sheet = contact_sheet(expected)
    assert (h, w) == tuple(sheet.shape[:2])
    assert "median" in capsys.readouterr().out
