"""The break-it matrix of SPEC section 11, driven by ``[[faults.drill]]`` config.

Each multi-process test runs real ``ppstage launch`` processes with a drill in
the one parity-checked config, and asserts: the exact error class, that the
report names the right rank and phase, that every process exited (or kept
streaming, for B8), and that no stale or wrong frame was emitted (every emitted
chunk is bitwise the reference's). The liveness rows (B15 stalls, B16 cold and
warm deadlines, the end of a stream, B17 a dead launcher) are in
``test_breakit_liveness.py``; the helpers both use in ``breakit_helpers.py``.
Rows covered elsewhere:

| row | test |
|---|---|
| B1 | test_parity.py (mode/topology/debug flag); here: a drill on one rank only |
| B2 | test_pipeline.py (extra call); here: a skipped call |
| B3 | test_validate.py + test_transport.py (sender); here: forced onto the wire |
| B4 | test_transport.py::test_preflight_* |
| B5 | test_pipeline.py (corrupt envelope); here: unknown version |
| B6, B7 | test_pipeline.py::test_injected_fault_* |
| B9 | test_gate.py (duplicates, reorder), test_stateful.py |
| B11 | test_pipeline.py::test_killing_any_rank_*; here: exit_rank drill |
| B12, B14 | test_pipeline.py (keepalives, SIGTERM) |
| B13 | test_codec.py (mutations, random bytes), test_fuzz.py |

Every figure "injection -> every rank exited" is measured from the drill's own
``drill fired`` log line (wall clock) to the moment the last process was reaped.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import torch
from breakit_helpers import all_failed, config, drill, report_figure, run
from dist_helpers import run_ranks
from wire_samples import infer_envelope as sample_envelope

from ppstage.config import PPStageConfig
from ppstage.distributed.topology import ProcessGroups, build_groups, role_for
from ppstage.distributed.transport import FrameWriter, Transport, byte_view, make_spec, preamble_capacity
from ppstage.distributed.transport._tensors import frame_limit_bytes
from ppstage.errors import ChannelDead
from protocol import (
    InferEnvelope,
    MetadataError,
    NoopEnvelope,
    TensorSpecError,
    decode_frame,
    encode_frame,
)


# -- B1: a drill on one rank only ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b1_a_drill_on_one_rank_only_stops_every_rank_at_parity_naming_faults_drill(tmp_path):
    plain = config()
    drilled = config(drill("stall_decode", 0, 3))
    r = run(tmp_path, plain, config_overrides={0: drilled}, timeout=40.0)
    assert r.codes == [2, 2, 2], r.tails()
    for rank in range(3):
        assert "faults.drill" in r.log(rank), r.log(rank)[-1500:]


# -- B2: a skipped generator call --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b2_a_skipped_generator_call_is_a_call_count_mismatch_at_the_stage(tmp_path):
    r = run(tmp_path, config(drill("skip_generator_call", 1, 2)))
    all_failed(r)
    assert "CallCountMismatch" in r.error and "stage 1 (rank 1)" in r.error, r.error
    assert "chunk ended after 3 generator calls, planned 4" in r.error
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B2 skip_generator_call", r)


# -- B3: recompute without its context, forced onto the wire ---------------------------------------


@pytest.mark.timeout(60)
def test_b3_missing_context_on_the_wire_is_refused_by_the_leader_before_any_mesh_collective(tmp_path):
    r = run(tmp_path, config(drill("drop_context_override", 0, 2), stages=1, tp=2, mode="r0a"))
    all_failed(r)
    assert "InvariantViolation" in r.error and "context_frames_override is missing" in r.error, r.error
    assert "stage 1 (rank 1)" in r.error
    assert "terminal action from leader" in r.log(2)  # the follower was told, not left waiting
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B3 drop_context_override", r)


# -- B5: an unknown protocol version at a leader ---------------------------------------------------


@pytest.mark.timeout(60)
def test_b5_unknown_version_envelope_ends_the_mesh_and_rank0_gets_the_leaders_error(tmp_path):
    r = run(tmp_path, config(drill("unknown_version_envelope", 0, 2), stages=1, tp=2))
    all_failed(r)
    assert "UnsupportedVersion" in r.error and "version 99" in r.error, r.error
    assert "terminal action from leader" in r.log(2)
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B5 unknown_version_envelope", r)


# -- B8: a late result after a hard cut -------------------------------------------------------------


@pytest.mark.timeout(90)
def test_b8_a_result_delayed_past_a_hard_cut_is_dropped_and_the_new_epoch_streams(tmp_path):
    cfg = config(drill("delay_result", 2, 5, ms=1500), **{"runtime.result_deadline_min_s": 8.0})
    r = run(tmp_path, cfg, chunks=10, cuts=(6,))
    assert r.codes == [0, 0, 0], r.tails()
    outcome = {e["chunk_index"]: e["outcome"] for e in r.result["events"]}
    assert outcome[5] in ("stale_epoch", "flushed"), outcome  # never decoded or emitted
    assert r.result["gate"].get("dropped_stale_epoch", 0) + r.result["summary"]["dropped"].get("flushed", 0) >= 1
    assert all(outcome[k] == "emitted" for k in range(6, 10)), outcome
    r.emitted_match_reference()


# -- B10: a collective on the wrong group ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b10_a_collective_on_another_stages_group_is_refused_before_it_is_issued(tmp_path):
    r = run(tmp_path, config(drill("wrong_group_collective", 1, 2)))
    all_failed(r)
    assert "WrongGroup" in r.error and "refused all_reduce on the stage 2 mesh from rank 1" in r.error, r.error
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B10 wrong_group_collective", r)


# -- B11: a rank exits mid-stream ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b11_a_stage_leader_exiting_mid_stream_ends_every_rank_within_the_window(tmp_path):
    r = run(tmp_path, config(drill("exit_rank", 1, 3)))
    all_failed(r)
    assert r.codes[1] == 1
    assert "ChannelDead" in r.error or "stopped making progress" in r.error, r.error
    assert r.seconds_to_exit() < 15.0
    assert r.emitted_match_reference() <= 3
    report_figure("B11 exit_rank", r)


# -- B18: a field of the wrong type is refused by the sender ---------------------------------------


@pytest.mark.timeout(60)
def test_b18_a_float_in_an_int_field_is_refused_by_rank0s_preflight_never_by_the_receiver(tmp_path):
    r = run(tmp_path, config(drill("wrong_type_field", 0, 2)))
    all_failed(r)
    assert "MetadataError" in r.error and "current_start_frame" in r.error, r.error
    assert "Expected `int`, got `float`" in r.error
    for rank in (1, 2):  # the stages heard rank 0's reason; no receiver decode failed
        assert "current_start_frame" in r.log(rank) and "FramingError" not in r.log(rank)
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B18 wrong_type_field", r)


# -- B19: a payload that disagrees with its spec --------------------------------------------------------


@pytest.mark.timeout(60)
def test_b19_a_payload_shorter_than_its_spec_is_refused_by_the_sender_naming_the_call(tmp_path):
    r = run(tmp_path, config(drill("payload_length_lie", 0, 2)))
    all_failed(r)
    assert "TensorSpecError" in r.error and "tensor 'latents_in'" in r.error and "chunk_index=2" in r.error, r.error
    assert 0 <= r.emitted_match_reference() <= 2


# -- B18 / B19 at the wire boundary: pure, and through a real Transport ---------------------------------


WRONG_TYPES = [
    ("float for int", dict(current_start_frame=21.0), "Expected `int`, got `float`"),
    ("int for bool", dict(do_kv_recompute=1), "Expected `bool`, got `int`"),
    ("str for float", dict(kv_cache_attention_bias="1.0"), "Expected `float`, got `str`"),
    ("tensor for int", dict(base_seed=torch.tensor(3)), "not serialisable"),
]


@pytest.mark.parametrize("label, fields, words", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_b18_the_encoder_refuses_a_field_of_the_wrong_type_before_any_header(label, fields, words):
    msg = msgspec.structs.replace(sample_envelope(), **fields)
    with pytest.raises(MetadataError, match=words) as info:
        encode_frame(msg)
    assert info.value.call_id == msg.call_id  # names the call


def test_b18_what_the_encoder_accepts_the_receivers_decoder_accepts():
    msg = sample_envelope()
    head, meta = encode_frame(msg)
    assert decode_frame(head + meta) == msg


def _lone(fatals: list) -> Transport:
    cfg = PPStageConfig().with_overrides({"topology.stages": 1})
    groups = ProcessGroups(rank=0, world=None, link_groups={(0, 1): object()})
    return Transport(cfg, role_for(cfg, 0), groups, loop=asyncio.get_running_loop(),
                     geometry=cfg.wire_geometry(), on_fatal=fatals.append)


def _sample_tensors(msg: InferEnvelope) -> list[torch.Tensor]:
    return [torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in msg.tensors]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("label, fields, words", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
async def test_b18_the_transport_preflight_refuses_wrong_types_and_queues_nothing(label, fields, words):
    fatals: list = []
    t = _lone(fatals)
    msg = sample_envelope(recompute=False)
    with pytest.raises(MetadataError, match=words):
        await t.send(1, msgspec.structs.replace(msg, **fields), _sample_tensors(msg))
    assert t._outbox.empty() and not fatals
    t.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("delta", [-1, +1], ids=["shorter", "longer"])
async def test_b19_a_payload_shorter_or_longer_than_its_spec_is_refused_naming_the_call(delta):
    fatals: list = []
    t = _lone(fatals)
    msg = sample_envelope(recompute=False)
    tensors = _sample_tensors(msg)
    lat = tensors[0]
    tensors[0] = torch.zeros((lat.shape[0] + delta, *lat.shape[1:]))
    with pytest.raises(TensorSpecError, match="tensor 'latents_in'") as info:
        await t.send(1, msg, tensors)
    assert (info.value.call_id, info.value.chunk_index) == (msg.call_id, msg.chunk_index)
    assert t._outbox.empty() and not fatals
    t.close()


@pytest.mark.timeout(20)
async def test_every_send_settles_when_close_races_it():
    # close() from another thread while sends are being queued: each await ends,
    # either sent (here: failed on the dummy link, ChannelDead) or refused.
    import threading

    fatals: list = []
    t = _lone(fatals)
    sends = [asyncio.ensure_future(t.send(1, NoopEnvelope(call_id=i, chunk_index=0, cache_epoch=0)))
             for i in range(1, 200)]
    threading.Thread(target=t.close).start()
    outcomes = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 10)
    assert all(o is None or isinstance(o, ChannelDead) for o in outcomes), outcomes[:3]


def test_frame_limit_follows_the_geometry_and_admits_every_legitimate_frame():
    g = PPStageConfig().wire_geometry()
    limit = frame_limit_bytes(g)
    envelope = sum(s.nbytes for s in sample_envelope(recompute=True).tensors)
    assert envelope < limit < 1 << 24
    assert frame_limit_bytes(None) >= 1 << 30


# -- B19 across three real processes: mixed dtypes of equal size; a frame over the limit -------------


def _tiny_cfg() -> PPStageConfig:
    return PPStageConfig().with_overrides({"topology.stages": 2, "runtime.pg_timeout_s": 5.0})


def _mixed_envelopes():
    """Envelopes whose three tensors have equal byte sizes (32 B) and different dtypes/shapes."""
    out = []
    for i in range(12):
        latents = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 4) + i
        cond = torch.full((1, 8), float(-i)) if i % 2 else torch.full((2, 4), float(i))  # 32 B, two shapes
        steps = torch.tensor([1000 - i, 750, 500, 250], dtype=torch.int64)  # 32 B of int64
        tensors = [latents, cond, steps]
        names = ["latents_in", "conditioning_embeds", "denoising_step_list"]
        msg = msgspec.structs.replace(
            sample_envelope(recompute=False), call_id=i + 1, chunk_index=i + 1, num_frames=1, latent_channels=1,
            height=2, width=4, tensors=tuple(make_spec(n, x) for n, x in zip(names, tensors)),
        )
        out.append((msg, tensors))
    return out


def _mixed_dtype_worker(ctx):
    cfg = _tiny_cfg()
    ctx.init(cfg)
    role, groups = role_for(cfg, ctx.rank), build_groups(cfg, ctx.rank)

    async def main():
        fatals: list = []
        t = Transport(cfg, role, groups, loop=asyncio.get_running_loop(), geometry=None, on_fatal=fatals.append)
        frames = _mixed_envelopes()
        if ctx.rank == 0:
            for msg, tensors in frames:
                await t.send(1, msg, tensors)
            await asyncio.sleep(1.0)
            return {"fatals": [repr(f) for f in fatals]}
        inbox = t.open_inbound(ctx.rank - 1)
        seen = []
        for msg, tensors in frames:
            item = await asyncio.wait_for(inbox.get(), 20)
            got = [item.tensors[s.name] for s in item.msg.tensors]
            seen.append(item.error is None and all(
                g.dtype == x.dtype and g.shape == x.shape and torch.equal(byte_view(g), byte_view(x))
                for g, x in zip(got, tensors)))
            if ctx.rank == 1:  # forward what was received, as a stage leader does
                await t.send(2, item.msg, got)
        await asyncio.sleep(1.0)
        return {"ok": seen, "fatals": [repr(f) for f in fatals]}

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_b19_mixed_dtypes_of_equal_size_cross_three_ranks_bitwise_with_their_own_dtype():
    outcomes = run_ranks("test_breakit:_mixed_dtype_worker", 3)
    assert outcomes[0].result == {"fatals": []}
    for o in outcomes[1:]:
        assert o.result == {"ok": [True] * 12, "fatals": []}, o.output


def _oversize_worker(ctx):
    import torch.distributed as dist

    cfg = _tiny_cfg()
    ctx.init(cfg)
    role, groups = role_for(cfg, ctx.rank), build_groups(cfg, ctx.rank)
    if ctx.rank == 2:
        return {}

    async def main():
        fatals: list = []
        t = Transport(cfg, role, groups, loop=asyncio.get_running_loop(), geometry=cfg.wire_geometry(),
                      on_fatal=fatals.append)
        if ctx.rank == 0:
            # A raw sender: a spec announcing 256 MiB (within the codec's own bounds).
            msg = sample_envelope(recompute=False)
            big = msgspec.structs.replace(msg.tensors[0], shape=(1 << 24, 4), nbytes=1 << 28)
            head, meta = encode_frame(msgspec.structs.replace(msg, tensors=(big, *msg.tensors[1:])))
            # The frame's preamble (header + metadata) goes out as the transport's own
            # writer frames it; the 256 MiB it announces never follow.
            writer = FrameWriter(torch.device("cpu"), preamble_capacity("gloo"), exact=False)
            writer.send(head, meta, (), lambda buf: dist.send(buf, dst=1, group=groups.link(0, 1)))
            await asyncio.sleep(2.0)
            return {}
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t.open_inbound(0)
        t0 = time.monotonic()
        while not fatals and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.01)
        grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        return {"fatals": [f"{type(f).__name__}: {f}" for f in fatals], "grew_kib": grew_kib}

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_b19_a_frame_over_the_geometrys_limit_is_refused_before_any_allocation():
    receiver = run_ranks("test_breakit:_oversize_worker", 3)[1].result
    assert len(receiver["fatals"]) == 1, receiver
    assert receiver["fatals"][0].startswith("FramingError") and "refused before allocation" in receiver["fatals"][0]
    assert receiver["grew_kib"] < 64 * 1024  # nowhere near the 256 MiB announced
