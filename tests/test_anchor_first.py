"""R0a anchor-first decode: the frame the next anchor needs is decoded first, the bytes never change."""

from __future__ import annotations

import pytest
import torch

from ppstage.config import PPStageConfig
from ppstage.core.planner import Planner, StreamStart
from ppstage.model.backend import (
    BackendContractError,
    ToyStage0,
    check_frame_independent_decode,
)
from ppstage.model.stream_inputs import StreamInputs
from ppstage.observability.report import check_digests
from ppstage.model.reference import run_reference
from test_pipeline import CHUNKS, SCRIPT, config_for, run_pipeline


@pytest.mark.parametrize("threads", [1, 2])
def test_the_toy_vae_decodes_each_frame_alone_to_the_bytes_of_the_whole_chunk(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backend = ToyStage0(PPStageConfig().model)
        for seed in range(5):
            latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * 2
            check_frame_independent_decode(backend, latents)
    finally:
        torch.set_num_threads(previous)


def test_a_decoder_that_mixes_frames_breaks_the_contract():
    class Mixing(ToyStage0):
        def vae_decode(self, latents):
            return super().vae_decode(latents + latents.mean(0, keepdim=True))

    with pytest.raises(BackendContractError):
        check_frame_independent_decode(Mixing(PPStageConfig().model), torch.randn(3, 4, 8, 8))


def _plans(config: PPStageConfig, n: int):
    planner = Planner(config)
    planner.submit(StreamStart(prompt="a red fox"))
    return [planner.next_chunk() for _ in range(n)]


@pytest.mark.parametrize("frames, back, offsets", [(3, 3, (0,)), (3, 4, ()), (3, 6, ()), (4, 3, (1,))])
def test_anchor_offsets_name_the_frame_the_next_chunk_takes_as_its_anchor(frames, back, offsets):
    config = PPStageConfig().with_overrides(
        {"recompute.mode": "r0a", "recompute.decoded_buffer_frames": back, "cache.window_frames": 9,
         "cache.chunk_frames": frames}
    )
    stream = StreamInputs(config)
    plans = _plans(config, 8)
    for plan in plans[2:5]:
        got = stream.anchor_offsets(plan)
        assert got == offsets
        got_frames = {plan.current_start_frame + o for o in got}
        nxt = plans[plans.index(plan) + 1]
        want = {nxt.anchor_frame} & set(range(plan.current_start_frame, plan.end_frame))
        assert got_frames == want  # exactly the frame the next chunk anchors on, if it is in this one


def test_frame_by_frame_decode_keeps_the_buffer_and_bytes_of_a_whole_decode():
    config = PPStageConfig().with_overrides({"recompute.mode": "r0a", "recompute.decoded_buffer_frames": 3})
    whole, parts = StreamInputs(config), StreamInputs(config)
    for plan in _plans(config, 4):
        latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(plan.chunk_index))
        a = whole.decode(plan, latents)
        first = parts.decode_frames(plan, latents, (0,))
        rest = parts.decode_frames(plan, latents, (1, 2))
        assert torch.equal(a, torch.cat([first, rest]))
        assert list(whole.decoded_frame_buffer) == list(parts.decoded_frame_buffer)
        assert all(torch.equal(x, y) for x, y in zip(whole.decoded_frame_buffer.values(),
                                                      parts.decoded_frame_buffer.values()))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("anchor_first", [True, False], ids=["anchor-first", "decode-first"])
def test_r0a_with_the_anchor_from_the_previous_chunk_is_bitwise_equal_to_the_reference(tmp_path, anchor_first):
    # decoded_buffer_frames = chunk_frames: each chunk's anchor is the first frame of the
    # chunk before it, so anchor-first really reorders the decode.
    config = config_for(2, "r0a", simulated_decode_ms=30.0, anchor_first_decode=anchor_first).with_overrides(
        {"recompute.decoded_buffer_frames": 3}
    )
    pipe, codes = run_pipeline(tmp_path, config)
    assert codes == [0, 0, 0], [pipe.log_tail(r) for r in range(3)]
    result = pipe.summary()
    check = check_digests(result["events"], run_reference(config, CHUNKS, SCRIPT))
    assert check.ok, check
    events = {e["chunk_index"]: e for e in result["events"] if e["outcome"] == "emitted"}
    steady = [k for k in events if k + 1 in events and k >= 2 and events[k + 1]["cache_epoch"] == events[k]["cache_epoch"]]
    early = [k for k in steady if events[k + 1]["sent"] < events[k]["decode_end"]]
    if anchor_first:
        assert early, "no envelope went out before the previous chunk's decode ended"
    else:
        assert not early  # decode-first: chunk k+1's anchor exists only once chunk k is decoded
