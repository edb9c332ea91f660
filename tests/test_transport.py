"""Transport: framed P2P between real processes (gloo), preflight, fatal paths.

Worker functions (``_*_worker``) run in child processes started by
``dist_helpers.run_ranks``; the ``test_*`` functions assert on what they return.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import threading
import time
import zlib
from datetime import timedelta

import msgspec
import pytest
import torch
from dist_helpers import run_ranks

from ppstage.config import PPStageConfig
from ppstage.errors import ChannelDead, PPStageError
from ppstage.distributed.topology import ProcessGroups, WrongGroup, build_groups, role_for
from ppstage.distributed.transport._frames import PREAMBLE_BYTES, FrameWriter, preamble_capacity
from ppstage.distributed.transport import (
    TORCH_DTYPE,
    Transport,
    byte_view,
    make_spec,
    tensor_digest,
)
from protocol import (
    HEADER_SIZE,
    MAX_META_BYTES,
    ChunkResult,
    ErrorEnvelope,
    InferEnvelope,
    InvariantViolation,
    MetadataError,
    NoopEnvelope,
    ParityHello,
    ProtocolError,
    ShutdownEnvelope,
    StageHop,
    StageReport,
    TensorSpecError,
    canonical_bytes,
    encode_frame,
)

# -- message builders (deterministic from their arguments) -----------------------


def _config(**overrides) -> PPStageConfig:
    base = {"topology.stages": 1, "topology.tp": 1, "runtime.pg_timeout_s": 5.0}
    base.update(overrides)
    return PPStageConfig().with_overrides(base)


CFG = _config()
GEOM = CFG.wire_geometry()
FRAME = (GEOM.latent_channels, GEOM.height, GEOM.width)
CHUNK = (GEOM.num_frames, *FRAME)


def _latents(seed: int, frames: int = GEOM.num_frames) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn((frames, *FRAME), generator=g)
    # Bitwise, not numerically, equal: NaN payloads, -0.0 and inf must survive.
    flat = t.view(-1)
    flat[0], flat[1], flat[2] = float("nan"), -0.0, float("inf")
    return t


def infer(call_id: int, *, recompute: bool = False, digest: bool = False):
    """A valid INFER envelope and its tensors (steady state, R0a)."""
    start = 3 * call_id + 3
    tensors = [
        _latents(call_id),
        torch.randn((GEOM.text_tokens, GEOM.text_dim), generator=torch.Generator().manual_seed(call_id)),
        torch.tensor([1000, 750, 500, 250], dtype=torch.int64),
    ]
    ctx: tuple[int, ...] = ()
    if recompute:
        ctx = (0, start - 2, start - 1)
        tensors.append(_latents(call_id + 10_000, frames=len(ctx)))
    names = ["latents_in", "conditioning_embeds", "denoising_step_list", "context_frames_override"]
    specs = tuple(make_spec(n, t, with_digest=digest) for n, t in zip(names, tensors))
    msg = InferEnvelope(
        call_id=call_id,
        chunk_index=call_id,
        cache_epoch=0,
        height=GEOM.height,
        width=GEOM.width,
        num_frames=GEOM.num_frames,
        latent_channels=GEOM.latent_channels,
        current_start_frame=start,
        init_cache=False,
        reset_kv_cache=False,
        reset_crossattn_cache=False,
        do_kv_recompute=recompute,
        num_denoise_steps=4,
        expected_generator_calls=4 + int(recompute),
        kv_cache_attention_bias=1.0,
        base_seed=42,
        recompute_mode="r0a",
        anchor_mode="decoded",
        context_frame_indices=ctx,
        tensors=specs,
    )
    return msg, tensors


def result(call_id: int):
    out = _latents(call_id + 20_000)
    report = StageReport(
        stage=1,
        current_start_frame=3 * call_id,
        global_end_index=5,
        local_end_index=5,
        state_digest="s",
        observed_generator_calls=4,
        duration_s=0.01,
    )
    msg = ChunkResult(
        call_id=call_id,
        chunk_index=call_id,
        cache_epoch=0,
        ok=True,
        observed_generator_calls=4,
        stages=(report,),
        output_digest=tensor_digest(out),
        tensors=(make_spec("latents_out", out),),
    )
    return msg, [out]


def big_hop(call_id: int, rows: int = 1 << 16):
    """A 4 MiB hidden-state hop (geometry-free validation accepts any row count)."""
    hidden = torch.full((rows, 16), float(call_id))
    msg = StageHop(
        call_id=call_id,
        chunk_index=call_id,
        cache_epoch=0,
        call_kind="denoise",
        step=0,
        target="hidden",
        tensors=(make_spec("hidden", hidden),),
    )
    return msg, [hidden]


def noop(call_id: int):
    return NoopEnvelope(call_id=call_id, chunk_index=0, cache_epoch=0), []


def shutdown(call_id: int):
    return ShutdownEnvelope(call_id=call_id, chunk_index=0, cache_epoch=0), []


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(byte_view(a), byte_view(b))


def _matches(item, expected) -> bool:
    msg, tensors = expected
    if canonical_bytes(item.msg) != canonical_bytes(msg) or item.error is not None:
        return False
    return [s.name for s in msg.tensors] == list(item.tensors) and all(
        _same_bits(item.tensors[s.name], t) for s, t in zip(msg.tensors, tensors)
    )


# -- worker plumbing ---------------------------------------------------------------


def _bootstrap(ctx, cfg: PPStageConfig = CFG):
    ctx.init(cfg)
    return role_for(cfg, ctx.rank), build_groups(cfg, ctx.rank)


def _open(cfg, role, groups, fatals: list, geometry=None) -> Transport:
    return Transport(
        cfg,
        role,
        groups,
        loop=asyncio.get_running_loop(),
        geometry=geometry,
        on_fatal=fatals.append,
    )


async def _until(predicate, timeout: float) -> float:
    """Poll ``predicate`` on the loop; return the seconds it took (raise on timeout)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


# -- round trip, order, both directions at once ------------------------------------

N_FRAMES = 40


def _outbound_plan(rank: int):
    """What ``rank`` sends, in order: rank 0 envelopes and hops, rank 1 results and hops."""
    plan = []
    for i in range(N_FRAMES):
        if rank == 0:
            kind = ("infer", "infer_ctx", "noop", "hop", "infer_digest")[i % 5]
            build = {
                "infer": lambda i: infer(i),
                "infer_ctx": lambda i: infer(i, recompute=True),
                "noop": noop,
                "hop": big_hop,
                "infer_digest": lambda i: infer(i, digest=True),
            }[kind]
        else:
            build = big_hop if i % 4 == 3 else result
        plan.append(build(i))
    plan.append(shutdown(N_FRAMES))
    return plan


def _roundtrip_worker(ctx):
    cfg = CFG
    role, groups = _bootstrap(ctx, cfg)
    peer = 1 - ctx.rank

    async def main():
        fatals: list = []
        transport = _open(cfg, role, groups, fatals)
        inbox = transport.open_inbound(peer)
        mine, theirs = _outbound_plan(ctx.rank), _outbound_plan(peer)

        async def send_all():
            for i, (msg, tensors) in enumerate(mine):
                # Digest-carrying envelopes are also sent with specs left empty and
                # fill_digests on: the receiver must see identical metadata.
                if ctx.rank == 0 and i % 5 == 4 and i % 2:
                    bare, _ = infer(i)
                    await transport.send(peer, bare, tensors, fill_digests=True)
                else:
                    await transport.send(peer, msg, tensors)

        async def receive_all():
            ok = []
            for expected in theirs:
                item = await asyncio.wait_for(inbox.get(), 20)
                ok.append(_matches(item, expected))
            return ok

        _, ok = await asyncio.gather(send_all(), receive_all())
        if ctx.rank == 1:
            ctx.linger = False  # leave at once, like a stage after SHUTDOWN
        else:
            # The peer leaves after SHUTDOWN: the receiver sees the link close and
            # must stop quietly, not report a dead channel.
            await _until(lambda: not any(t.name.endswith("from-r1") for t in threading.enumerate()), 15)
        transport.close()
        return {"all_match": all(ok), "count": len(ok), "fatals": [repr(f) for f in fatals]}

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_frames_round_trip_bitwise_in_order_in_both_directions_then_shut_down_quietly():
    outcomes = run_ranks("test_transport:_roundtrip_worker", 2)
    for o in outcomes:
        assert o.result == {"all_match": True, "count": N_FRAMES + 1, "fatals": []}, o.output


# -- B4: preflight failures never reach the wire ----------------------------------


def _bad_sends():
    """(label, message, tensors, expected error type): each fails before queueing."""
    m, t = infer(100)
    float64 = [t[0].double(), *t[1:]]
    wrong_shape = [t[0][:2], *t[1:]]
    ctx_msg, ctx_tensors = infer(101, recompute=True)
    unserialisable = ErrorEnvelope(call_id=102, chunk_index=0, cache_epoch=0, reason=object())
    return [
        ("unserialisable", unserialisable, [], MetadataError),
        ("int overflow", NoopEnvelope(call_id=2**70, chunk_index=0, cache_epoch=0), [], MetadataError),
        ("unsupported dtype", m, float64, TensorSpecError),
        ("wrong shape", m, wrong_shape, TensorSpecError),
        ("missing tensor", m, t[:2], TensorSpecError),
        ("not a tensor", m, [t[0], t[1], [1000, 750, 500, 250]], TensorSpecError),
        (
            "recompute without context",
            msgspec.structs.replace(ctx_msg, tensors=ctx_msg.tensors[:3]),
            ctx_tensors[:3],
            InvariantViolation,
        ),
        ("field of wrong type", msgspec.structs.replace(m, current_start_frame="three"), t, MetadataError),
        ("not a wire message", object(), [], MetadataError),
    ]


def _preflight_worker(ctx):
    role, groups = _bootstrap(ctx)

    async def main():
        fatals: list = []
        transport = _open(CFG, role, groups, fatals)
        if ctx.rank == 0:
            refused = []
            for label, msg, tensors, _ in _bad_sends():
                try:
                    await transport.send(1, msg, tensors)
                    refused.append([label, None])
                except ProtocolError as exc:
                    refused.append([label, type(exc).__name__])
            for msg, tensors in (noop(200), infer(201), shutdown(202)):
                await transport.send(1, msg, tensors)
            transport.close()
            return {"refused": refused, "fatals": [repr(f) for f in fatals]}
        inbox = transport.open_inbound(0)
        seen = []
        for _ in range(3):
            item = await asyncio.wait_for(inbox.get(), 20)
            seen.append([item.msg.call_id, item.error is None])
        return {"seen": seen, "fatals": [repr(f) for f in fatals]}

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_preflight_failures_raise_typed_errors_and_the_peer_sees_only_the_next_valid_frame():
    sender, receiver = (o.result for o in run_ranks("test_transport:_preflight_worker", 2))
    expected = [[label, err.__name__] for label, _, _, err in _bad_sends()]
    assert sender == {"refused": expected, "fatals": []}
    assert receiver == {"seen": [[200, True], [201, True], [202, True]], "fatals": []}


# -- B13: garbage on the wire is a typed fatal error, never a hang ------------------


def _raw_header(meta_len: int, checksum: int = 0) -> bytes:
    return struct.pack("<4sBBHqqqII", b"PPS1", 1, 2, 0, 1, 0, 0, meta_len, checksum)


def _preamble(*parts: bytes) -> bytes:
    """A preamble as the transport sends it: ``parts`` then zeros, ``PREAMBLE_BYTES`` long."""
    data = b"".join(parts)
    return data + bytes(PREAMBLE_BYTES - len(data))


def _garbage_cases() -> list[tuple[str, list[bytes]]]:
    """(label, raw sends): each breaks framing in a different way."""
    rng = random.Random(13)
    header, meta = encode_frame(NoopEnvelope(call_id=5, chunk_index=0, cache_epoch=0))
    too_long = _raw_header(MAX_META_BYTES + 1)
    return [
        ("random header", [_preamble(rng.randbytes(HEADER_SIZE))]),
        ("random header 2", [_preamble(rng.randbytes(HEADER_SIZE))]),
        ("truncated header", [header[:10]]),
        ("header checksum broken", [_preamble(header[:-4] + struct.pack("<I", zlib.crc32(b"x")), meta)]),
        ("random metadata", [_preamble(header, rng.randbytes(len(meta)))]),
        ("truncated metadata", [_preamble(header, meta[: len(meta) // 2])]),
        ("metadata length over the limit", [_preamble(too_long)]),
        # A 4 MiB tensor does not fit the preamble: the receiver waits for it.
        ("stalls after the metadata", [_preamble(*encode_frame(big_hop(7)[0]))]),
    ]


def _garbage_worker(ctx):
    cfg = _config(**{"runtime.pg_timeout_s": 2.0})
    ctx.init(cfg)
    import torch.distributed as dist

    cases = _garbage_cases()
    links = [dist.new_group([0, 1]) for _ in cases]  # a fresh channel per case
    done = dist.new_group([0, 1])
    role = role_for(cfg, ctx.rank)
    if ctx.rank == 0:
        for (_, sends), link in zip(cases, links):
            for raw in sends:
                dist.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), dst=1, group=link)
        # Stay alive until the receiver is done: the stalled frame must time out,
        # not end because this process exited.
        dist.irecv(torch.zeros(1, dtype=torch.uint8), src=1, group=done).wait(timedelta(seconds=30))
        return {}

    async def main():
        out = {}
        for (label, _), link in zip(cases, links):
            fatals: list = []
            groups = ProcessGroups(rank=1, world=None, link_groups={(0, 1): link})
            transport = _open(cfg, role, groups, fatals)
            inbox = transport.open_inbound(0)
            took = await _until(lambda: fatals, timeout=10)
            transport.close()
            out[label] = {
                "error": type(fatals[0]).__name__,
                "typed": isinstance(fatals[0], (ProtocolError, PPStageError)),
                "delivered": inbox.qsize(),
                "seconds": round(took, 2),
            }
        return out

    out = asyncio.run(main())
    dist.send(torch.ones(1, dtype=torch.uint8), dst=0, group=done)
    return out


@pytest.mark.timeout(60)
def test_garbage_frames_are_typed_fatal_errors_never_crashes_or_hangs():
    _, receiver = run_ranks("test_transport:_garbage_worker", 2)
    seen = receiver.result
    assert list(seen) == [label for label, _ in _garbage_cases()]
    for label, r in seen.items():
        assert r["typed"] and r["delivered"] == 0, (label, r)
        assert r["seconds"] < 5, (label, r)
    assert seen["random header"]["error"] == "FramingError"
    assert seen["truncated metadata"]["error"] == "FramingError"
    assert seen["metadata length over the limit"]["error"] == "FramingError"
    # The frame started, then nothing: the group timeout turns it into a dead channel.
    assert seen["stalls after the metadata"]["error"] == "ChannelDead"


# -- well-framed but invalid frames are delivered with an error ------------------


def _invalid_frames_worker(ctx):
    role, groups = _bootstrap(ctx)

    async def main():
        fatals: list = []
        transport = _open(CFG, role, groups, fatals, geometry=GEOM)
        if ctx.rank == 0:
            import torch.distributed as dist

            link = groups.link(0, 1)
            # A raw sender bypassing preflight: recompute without its context tensor...
            m, t = infer(1, recompute=True)
            bad = msgspec.structs.replace(m, tensors=m.tensors[:3])
            # ...and a frame whose declared digest does not match its bytes.
            d, dt = infer(2, digest=True)
            forged = msgspec.structs.replace(
                d, tensors=(msgspec.structs.replace(d.tensors[0], digest="0" * 32), *d.tensors[1:])
            )
            writer = FrameWriter(torch.device("cpu"), preamble_capacity("gloo"), exact=False)  # no preflight
            for msg, tensors in ((bad, t[:3]), (forged, dt)):
                head, meta = encode_frame(msg)
                flats = [byte_view(tensor.contiguous()) for tensor in tensors]
                writer.send(head, meta, flats, lambda buf: dist.send(buf, dst=1, group=link))
            await transport.send(1, *noop(3))
            transport.close()
            return {}
        inbox = transport.open_inbound(0)
        seen = []
        for _ in range(3):
            item = await asyncio.wait_for(inbox.get(), 20)
            seen.append(
                {
                    "call_id": item.msg.call_id,
                    "error": type(item.error).__name__ if item.error else None,
                    "reason": item.error.reason if item.error else None,
                    "tensors": sorted(item.tensors),
                }
            )
        return {"seen": seen, "fatals": [repr(f) for f in fatals]}

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_invalid_but_well_framed_frames_arrive_with_an_error_and_framing_continues():
    _, receiver = run_ranks("test_transport:_invalid_frames_worker", 2)
    recompute, forged, keepalive = receiver.result["seen"]
    assert receiver.result["fatals"] == []
    assert recompute["error"] == "InvariantViolation"
    assert "context_frames_override is missing" in recompute["reason"]
    assert recompute["tensors"] == ["conditioning_embeds", "denoising_step_list", "latents_in"]
    assert forged["error"] == "DigestMismatch" and forged["call_id"] == 2
    assert keepalive == {"call_id": 3, "error": None, "reason": None, "tensors": []}


# -- a dead peer is a fatal ChannelDead within seconds ------------------------------


def _dead_peer_worker(ctx):
    role, groups = _bootstrap(ctx)

    async def main():
        fatals: list = []
        transport = _open(CFG, role, groups, fatals)
        inbox = transport.open_inbound(1 - ctx.rank)
        if ctx.rank == 1:
            await transport.send(0, *noop(1))
            os.kill(os.getpid(), signal.SIGKILL)
        first = await asyncio.wait_for(inbox.get(), 20)
        took = await _until(lambda: fatals, timeout=15)
        try:
            await transport.send(1, *noop(2))
            after = None
        except (ProtocolError, PPStageError) as exc:
            after = type(exc).__name__
        return {
            "first": first.msg.call_id,
            "fatal": type(fatals[0]).__name__,
            "seconds": took,
            "send_after": after,
        }

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_killing_the_peer_fires_channel_dead_within_seconds():
    survivor, killed = run_ranks("test_transport:_dead_peer_worker", 2, expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    assert survivor.returncode == 0, survivor.output
    r = survivor.result
    assert r["first"] == 1 and r["fatal"] == "ChannelDead" and r["send_after"] == "ChannelDead"
    assert r["seconds"] < 5


# -- unit tests: no processes --------------------------------------------------------


@pytest.fixture
async def lone_transport():
    """A rank-0 transport whose link group is a dummy: only preflight can run."""
    fatals: list = []
    groups = ProcessGroups(rank=0, world=None, link_groups={(0, 1): object()})
    t = Transport(CFG, role_for(CFG, 0), groups, loop=asyncio.get_running_loop(), on_fatal=fatals.append)
    yield t
    t.close()
    assert fatals == []


@pytest.mark.parametrize("label", [c[0] for c in _bad_sends()])
async def test_preflight_refuses_each_bad_send_with_its_typed_error(lone_transport, label):
    (_, msg, tensors, err), = [c for c in _bad_sends() if c[0] == label]
    with pytest.raises(err):
        await lone_transport.send(1, msg, tensors)
    assert lone_transport._outbox.empty()


async def test_send_to_a_rank_without_a_link_is_refused(lone_transport):
    with pytest.raises(WrongGroup):
        await lone_transport.send(2, *noop(1))


async def test_send_after_close_is_refused(lone_transport):
    lone_transport.close()
    with pytest.raises(ChannelDead):
        await lone_transport.send(1, *noop(1))


async def test_hello_skips_validation_but_not_framing(lone_transport):
    bad = ParityHello(call_id=0, chunk_index=0, cache_epoch=0, rank=0, settings={"k": object()})
    with pytest.raises(MetadataError):
        await lone_transport.send(1, bad, [])


@pytest.mark.parametrize("wire", sorted(TORCH_DTYPE))
def test_make_spec_names_each_wire_dtype_and_bytes(wire):
    t = torch.arange(6).reshape(2, 3).to(TORCH_DTYPE[wire])
    spec = make_spec("x", t, with_digest=True)
    assert (spec.dtype, spec.shape, spec.nbytes) == (wire, (2, 3), 6 * t.element_size())
    assert spec.digest == tensor_digest(t)


def test_make_spec_refuses_a_dtype_outside_the_whitelist():
    with pytest.raises(TensorSpecError):
        make_spec("x", torch.zeros(2, dtype=torch.float64))
