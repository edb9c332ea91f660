"""Long streams (SPEC section 13): the re-base transition, the overflow policy and forced cuts.

Pure pieces only (lifecycle, planner, gate, stream inputs, the model's caches and the
quality comparison); the distributed runs are in ``tests/test_long_streams.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from wire_samples import result_for

from ppstage.config import ConfigError, PPStageConfig
from ppstage.core.gate import EpochGate
from ppstage.core.lifecycle import CacheGeometry, CacheLifecycle
from ppstage.core.planner import HardCut, Planner, StreamStart
from ppstage.errors import IllegalRebase, IllegalTransition, OutOfOrderResult, PPStageError
from ppstage.model.quality import (
    QualityError,
    check_rebase_quality_report,
    format_table,
    rebase_changes_view,
    run_rebase_quality,
    write_report,
)
from ppstage.model.reference import run_reference
from ppstage.model.stream_inputs import StaleInputs, StreamInputs
from ppstage.model.transformer import LayerCache, RotaryTable, apply_rotary
from protocol import ProtocolError

import msgspec


def config(**overrides) -> PPStageConfig:
    return PPStageConfig().with_overrides(overrides)


def planner(cfg: PPStageConfig) -> Planner:
    p = Planner(cfg)
    p.submit(StreamStart("a fox"))
    return p


def apply(lc: CacheLifecycle, plan):
    window = lc.begin_chunk(plan)
    for i in range(plan.expected_generator_calls):
        lc.record_call("recompute" if plan.do_kv_recompute and i == 0 else "denoise")
    return window, lc.end_chunk()


def clone(lc: CacheLifecycle) -> CacheLifecycle:
    other = CacheLifecycle(lc.geometry)
    other._state = lc.state
    return other


def with_offset(plan, offset: int):
    return msgspec.structs.replace(plan, position_offset=offset)


# -- the lifecycle: a re-base keeps the window and every relative position -------------------

geometries = st.builds(
    lambda w, s, f: (w, s, f),
    st.integers(4, 9),
    st.integers(0, 2),
    st.integers(1, 3),
).filter(lambda g: g[0] >= max(g[1] + g[2] + 1, g[2] + 2))


@st.composite
def streams(draw):
    w, s, f = draw(geometries)
    mode = draw(st.sampled_from(["r1", "r0a", "r0"]))
    ctx = draw(st.integers(2, w - f))
    cfg = PPStageConfig().with_overrides(
        {
            "cache.window_frames": w,
            "cache.sink_frames": s,
            "cache.chunk_frames": f,
            "recompute.mode": mode,
            "recompute.cadence": draw(st.integers(1, 3)),
            "recompute.context_frames": ctx,
            "recompute.decoded_buffer_frames": draw(st.integers(ctx, ctx + 4)),
            "model.rope_max_frames": 100_000,  # the planner never re-bases: the test does
        }
    )
    rebase_at = draw(st.sets(st.integers(1, 24), max_size=8))
    fraction = draw(st.floats(0.0, 1.0))
    return cfg, rebase_at, fraction


@given(streams())
@settings(max_examples=120, deadline=None)
def test_rebase_keeps_the_window_and_the_relative_positions_of_the_frames_kept(case):
    cfg, rebase_at, fraction = case
    p = planner(cfg)
    lc = CacheLifecycle(cfg.cache_geometry())
    tpf = cfg.model.tokens_per_frame
    offset = 0
    for k in range(25):
        plan = with_offset(p.next_chunk(), offset)
        if k in rebase_at:
            # Preview without a re-base; the frames that may move are all but the pinned sinks.
            plain = clone(lc)
            window, _ = plain.begin_chunk(plan), None
            before = plain.state.slot_positions
            pinned = 0 if window.recompute is not None else window.sink_tokens // tpf
            movable = [*before[pinned:], window.position_start]
            limit = min(movable)  # up to landing a moved frame at position 0
            if cfg.recompute.mode != "r1":  # ... and never past what a later rebuild re-reads
                nxt = plan.end_frame
                future = nxt - cfg.recompute.decoded_buffer_frames if nxt >= cfg.recompute.decoded_buffer_frames else 0
                limit = max(0, min(limit, future - offset))
            delta = int(fraction * limit)
            event("positive shift" if delta else "zero shift")
            if delta and window.recompute is None and pinned and before[pinned:]:
                event("rolled window with pinned sinks re-based")
            rebased = clone(lc)
            rwin = rebased.begin_chunk(with_offset(plan, offset + delta))
            after = rebased.state.slot_positions
            assert len(after) == len(before), "a re-base never changes the frames in the window"
            assert after[:pinned] == before[:pinned], "pinned sinks keep their positions"
            assert after[pinned:] == tuple(q - delta for q in before[pinned:])
            assert rwin.position_start == window.position_start - delta
            same = ("roll_tokens", "sink_tokens", "write_start", "write_end", "global_start", "global_end")
            assert [getattr(rwin, f) for f in same] == [getattr(window, f) for f in same]
            assert rebased.state.cache_epoch == plain.state.cache_epoch
            if window.recompute is None and delta and rwin.write_start > rwin.sink_tokens:
                assert rwin.rebase_shift == delta and rwin.rebase_keys == (rwin.sink_tokens, rwin.write_start)
            # One step further is illegal when it would push a moved frame below 0.
            too_far = min(movable) + 1
            digest = lc.digest()
            with pytest.raises(IllegalRebase):
                clone(lc).begin_chunk(with_offset(plan, offset + too_far))
            assert lc.digest() == digest
            offset += delta
            plan = with_offset(plan, offset)
        _, state = apply(lc, plan)
        assert len(state.slot_positions) * tpf == state.local_end_index
        assert min(state.slot_positions) >= 0


def _rolled(geometry=None):
    """A lifecycle holding a full rolled window: sink frame 0 + frames 7, 8 (R1, W=6, S=1, F=3)."""
    cfg = config(**{"recompute.mode": "r1", "model.rope_max_frames": 100})
    p = planner(cfg)
    lc = CacheLifecycle(geometry or cfg.cache_geometry())
    for _ in range(3):
        apply(lc, p.next_chunk())
    return lc, p


def test_rolled_window_rebase_moves_every_frame_but_the_pinned_sink():
    lc, p = _rolled()
    assert lc.state.slot_positions == (0, 4, 5, 6, 7, 8)
    plan = p.next_chunk()  # frames 9..11; the roll keeps the sink (0) and frames 7, 8
    assert lc.rebase_offset(plan) == 6  # frame 7 lands at position 1, right after the sink
    window = lc.begin_chunk(with_offset(plan, 6))
    assert lc.state.slot_positions == (0, 1, 2)
    assert (window.position_start, window.rebase_shift, window.rebase_keys) == (3, 6, (16, 48))


@pytest.mark.parametrize(
    "offset, match",
    [(-1, "negative"), (8, "position -1"), (7, "position 0")],
    ids=["negative offset", "moves a frame below 0", "legal"],
)
def test_an_offset_that_makes_a_position_negative_is_refused(offset, match):
    lc, p = _rolled()
    plan = with_offset(p.next_chunk(), offset)
    digest = lc.digest()
    if match == "position 0":
        lc.begin_chunk(plan)
        assert min(lc.state.slot_positions) == 0
        return
    with pytest.raises(IllegalRebase, match=match) as err:
        lc.begin_chunk(plan)
    assert lc.digest() == digest, "a refused re-base leaves the state untouched"
    assert (err.value.call_id, err.value.chunk_index) == (plan.call_id, plan.chunk_index)


def test_a_rebase_is_refused_in_the_middle_of_a_chunk():
    lc, p = _rolled()
    plan = p.next_chunk()
    lc.begin_chunk(plan)
    lc.record_call("denoise")
    later = msgspec.structs.replace(plan, call_id=plan.call_id + 1, chunk_index=plan.chunk_index + 1)
    with pytest.raises(IllegalRebase, match="chunk boundary"):
        lc.begin_chunk(with_offset(later, 6))


def test_offsets_never_move_up_and_a_hard_cut_restarts_them():
    lc, p = _rolled()
    apply(lc, with_offset(p.next_chunk(), 6))
    with pytest.raises(IllegalRebase, match="only moves positions down"):
        lc.begin_chunk(with_offset(p.next_chunk(), 3))
    p.submit(HardCut())
    cut = p.next_chunk()
    with pytest.raises(IllegalRebase, match="offset 0"):
        lc.begin_chunk(with_offset(cut, 6))
    lc.begin_chunk(cut)
    assert lc.state.position_offset == 0 and lc.state.slot_positions == ()


def test_a_chunk_past_the_positional_table_is_refused_without_a_rebase():
    geometry = CacheGeometry(window_frames=6, sink_frames=1, tokens_per_frame=16, chunk_frames=3, max_positions=12)
    lc, p = _rolled(geometry)
    plan = p.next_chunk()  # positions 9..11 fit; the next chunk would reach 14
    apply(lc, plan)
    with pytest.raises(IllegalTransition, match="past the positional table"):
        lc.begin_chunk(p.next_chunk())


def test_illegal_rebase_is_a_typed_runtime_error():
    assert issubclass(IllegalRebase, IllegalTransition) and issubclass(IllegalRebase, PPStageError)
    assert not issubclass(IllegalRebase, ProtocolError)


# -- the planner: re-bases instead of cuts ---------------------------------------------------


@pytest.mark.parametrize(
    "mode, cadence, sinks, table",
    [("r1", 1, 1, 9), ("r1", 1, 0, 8), ("r0a", 1, 1, 12), ("r0a", 2, 1, 12), ("r0", 3, 0, 18), ("r0a", 1, 2, 10)],
)
def test_planner_rebases_a_long_stream_without_a_cut(mode, cadence, sinks, table):
    cfg = config(**{
        "recompute.mode": mode, "recompute.cadence": cadence, "cache.sink_frames": sinks,
        "cache.window_frames": 7 if sinks == 2 else 6, "model.rope_max_frames": table,
    })
    p = planner(cfg)
    stage = CacheLifecycle(cfg.cache_geometry())  # what every generator rank does with the plans
    got = [p.next_chunk() for _ in range(120)]
    for plan in got:
        apply(stage, plan)
        assert plan.end_frame - plan.position_offset <= table
        assert plan.cache_epoch == 0 and not plan.forced_cut
    assert [x.init_cache for x in got] == [True] + [False] * 119
    offsets = [x.position_offset for x in got]
    assert offsets == sorted(offsets)
    rebases = [x.chunk_index for x in got if x.rebased]
    assert len(rebases) >= 10
    assert all(got[k].position_offset > got[k - 1].position_offset for k in rebases)
    assert [x.current_start_frame for x in got] == [3 * k for k in range(120)]  # the timeline never wraps


@given(streams(), st.integers(0, 6))
@settings(max_examples=80, deadline=None)
def test_any_config_with_a_table_of_rebase_span_streams_forever_without_a_cut(case, extra):
    cfg, _, _ = case
    cfg = cfg.with_overrides({"model.rope_max_frames": max(cfg.rebase_span(), 2 * cfg.cache.chunk_frames) + extra})
    p = planner(cfg)
    stage = CacheLifecycle(cfg.cache_geometry())
    rebases = 0
    for _ in range(60):
        plan = p.next_chunk()  # the planner's own lifecycle refuses an illegal plan here
        apply(stage, plan)
        assert plan.cache_epoch == 0 and plan.end_frame - plan.position_offset <= cfg.model.rope_max_frames
        rebases += plan.rebased
    assert rebases >= 1


def test_a_requested_cut_restarts_the_positions():
    p = planner(config(**{"model.rope_max_frames": 12}))
    plans = [p.next_chunk() for _ in range(8)]
    assert plans[-1].position_offset > 0
    p.submit(HardCut())
    cut = p.next_chunk()
    assert cut.init_cache and not cut.forced_cut and cut.position_offset == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.rope_max_frames": 8},  # r0a keeps anchor .. chunk end: 6 + 3
        {"recompute.mode": "r1", "model.rope_max_frames": 6, "cache.window_frames": 7},
        {"cache.sink_frames": 0, "recompute.cadence": 2, "model.rope_max_frames": 11},
    ],
)
def test_a_table_too_short_to_rebase_is_a_config_error_naming_the_fix(overrides):
    with pytest.raises(ConfigError, match="on_position_overflow"):
        config(**overrides)
    config(**overrides, **{"cache.on_position_overflow": "cut"})  # a cut needs only two chunks


# -- policy "cut": a forced cut keeps what was planned before it ------------------------------

CUT = {"cache.on_position_overflow": "cut", "model.rope_max_frames": 9, "recompute.mode": "r1"}


def _sent(p: Planner, gate: EpochGate, n: int):
    out = []
    for _ in range(n):
        plan = p.next_chunk()
        gate.expect(plan)
        out.append(plan)
    return out


def test_a_forced_cut_still_accepts_the_old_epochs_results_in_flight():
    p, gate = planner(config(**CUT)), EpochGate()
    old = _sent(p, gate, 3)
    (cut,) = _sent(p, gate, 1)
    assert cut.forced_cut and gate.epoch == 1 and gate.live_from == 0
    assert gate.in_flight_current() == 4
    for plan in [*old, cut]:
        assert gate.admit(result_for(plan)).accepted
    assert gate.statistics() == {"accepted": 4, "in_flight": 0}


def test_a_forced_cut_keeps_plan_order_across_epochs():
    p, gate = planner(config(**CUT)), EpochGate()
    old = _sent(p, gate, 3)
    (cut,) = _sent(p, gate, 1)
    with pytest.raises(OutOfOrderResult):
        gate.admit(result_for(cut))
    assert gate.admit(result_for(old[0])).accepted


def test_a_requested_cut_still_drops_what_is_in_flight():
    p, gate = planner(config(**CUT)), EpochGate()
    old = _sent(p, gate, 2)
    p.submit(HardCut())
    (cut,) = _sent(p, gate, 1)
    assert not cut.forced_cut and gate.live_from == 1
    for plan in old:
        verdict = gate.admit(result_for(plan))
        assert not verdict.accepted and verdict.reason == "stale_epoch"
    assert gate.admit(result_for(cut)).accepted


def test_a_requested_cut_after_a_forced_one_drops_both_old_epochs():
    p, gate = planner(config(**CUT)), EpochGate()
    old = _sent(p, gate, 4)  # epoch 0: 3 chunks, then a forced cut to epoch 1
    p.submit(HardCut())
    (cut,) = _sent(p, gate, 1)
    assert [x.cache_epoch for x in old] == [0, 0, 0, 1] and cut.cache_epoch == 2
    assert all(gate.admit(result_for(x)).reason == "stale_epoch" for x in old)


def test_stream_inputs_decode_the_old_epoch_after_a_forced_cut_but_never_keep_it():
    cfg = config(**CUT)
    stream, p = StreamInputs(cfg), planner(cfg)
    old = [p.next_chunk() for _ in range(3)]
    cut = p.next_chunk()
    assert cut.forced_cut
    stream.chunk_inputs(cut)
    latents = torch.zeros(3, 4, 8, 8)
    stream.record_latents(old[-1], latents)
    assert stream.decode(old[-1], latents).shape == (3, 3, 64, 64)
    assert stream.latent_frames() == () and stream.decoded_frame_buffer == {}
    p.submit(HardCut())
    requested = p.next_chunk()
    stream.chunk_inputs(requested)
    with pytest.raises(StaleInputs):
        stream.decode(cut, latents)


# -- the model: cached keys move in place ---------------------------------------------------------


def test_rerotated_keys_equal_keys_rotated_at_the_new_positions():
    cfg = PPStageConfig().model
    rope = RotaryTable(cfg)
    heads, hd, tpf = cfg.heads, cfg.dim // cfg.heads, cfg.tokens_per_frame
    raw = torch.randn(2 * tpf, heads, hd, generator=torch.Generator().manual_seed(0))
    cache = LayerCache(heads, 4 * tpf, hd)
    cache.k[:, tpf : 3 * tpf] = apply_rotary(raw, rope.for_frames([40, 41])[:, 0]).transpose(0, 1)
    cache.rerotate(tpf, 3 * tpf, rope.shift(-37))
    want = apply_rotary(raw, rope.for_frames([3, 4])[:, 0]).transpose(0, 1)
    assert torch.allclose(cache.k[:, tpf : 3 * tpf], want, atol=1e-5)
    assert torch.equal(cache.k[:, :tpf], torch.zeros(heads, tpf, hd))  # outside the range: untouched


def test_rebuild_rebases_match_the_oracle_and_pinned_sinks_change_the_view():
    """Cadence 1 re-bases land on rebuilds: every distance kept, only rounding differs.

    R1 pins its sink, so the sink comes closer: the output must differ from the
    oracle's (this is why such configs are gated by a quality report).
    """
    for mode, close in (("r0a", True), ("r1", False)):
        small = config(**{"recompute.mode": mode, "model.rope_max_frames": 12})
        big = small.with_overrides({"model.rope_max_frames": 1024})
        got, want = run_reference(small, 10), run_reference(big, 10)
        assert sum(r.rebased for r in got) >= 2 and not any(r.rebased for r in want)
        diff = max(float((a.latents_out - b.latents_out).abs().max()) for a, b in zip(got, want))
        assert (diff < 1e-3) == close, (mode, diff)
    assert not rebase_changes_view(config()) and rebase_changes_view(config(**{"recompute.mode": "r1"}))
    assert rebase_changes_view(config(**{"recompute.cadence": 2}))


# -- the quality comparison and its gate ------------------------------------------------------------


def test_rebase_quality_report_compares_against_the_oracle_and_gates_cadence_2(tmp_path):
    cfg = config(**{"recompute.cadence": 2, "model.rope_max_frames": 12})
    report = run_rebase_quality(cfg, chunks=8, threshold_db=30.0)
    assert (report.baseline, report.candidate, report.chunks) == ("oracle", "rebase", 8)
    assert report.rebase_chunks and report.oracle_table >= 27 and len(report.rows) == 8
    assert report.verdict == ("PASS" if (report.min_psnr_db or 1e9) >= 30.0 else "FAIL")
    table = format_table(report)
    assert "re-base at chunk" in table and report.verdict in table
    strict = run_rebase_quality(cfg, chunks=8, threshold_db=1e6)
    assert strict.verdict == ("PASS" if strict.min_psnr_db is None else "FAIL")

    with pytest.raises(QualityError, match="rebase_quality_report"):
        check_rebase_quality_report(cfg)
    assert check_rebase_quality_report(cfg, chunks=4) is None  # 12 frames never pass the table
    path = tmp_path / "rebase.json"
    write_report(path, report)
    gated = cfg.with_overrides({"cache.rebase_quality_report": str(path)})
    if report.passed:
        assert check_rebase_quality_report(gated).passed
    with pytest.raises(QualityError, match="different model or config"):
        check_rebase_quality_report(gated.with_overrides({"model.rope_max_frames": 15}))
    assert check_rebase_quality_report(config()) is None  # cadence 1: distances are kept


# -- constant memory: the bounded structures stay bounded over a re-basing stream ----------------


def test_long_stream_bench_keeps_every_per_chunk_structure_bounded():
    from ppstage.bench.long_stream import run_long_stream

    cfg = config(**{"model.rope_max_frames": 12})
    report = run_long_stream(cfg, 40, warmup=10, prompt_every=7)
    assert report.rebases >= 10 and report.epochs == 1
    s = report.sizes
    assert s["gate.outstanding"] == 0 and s["planner.pending"] == 0
    assert s["stream.decoded_frames"] <= cfg.recompute.decoded_buffer_frames
    assert s["stream.latent_frames"] <= cfg.recompute.decoded_buffer_frames + 2 * cfg.cache.chunk_frames + 1
    assert s["planner.slot_positions"] == s["stage.slot_positions"] <= cfg.cache.window_frames
    assert s["stage.modulation_cache"] <= 16
    assert report.rss_warm_kib > 0 and report.rss_end_kib > 0  # measured, never asserted on
