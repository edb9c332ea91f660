"""``CacheLifecycle``: the pure KV-cache state machine of SPEC section 3.

One instance governs one cache (all layers a process owns share it: they
advance in lockstep). It is the single source of truth for indices: the
tensor cache asks it for write windows and rolls and never computes an index
on the side. No I/O, no tensors.

Chunk protocol::

    window = lc.begin_chunk(plan)     # resets, recompute rebuild, roll decision
    lc.record_call("recompute")       # only if the plan says so, first
    lc.record_call("denoise") x N     # every call overwrites the same slot
    lc.end_chunk()                    # pointers move once per chunk

Indices are in tokens. ``global_end_index`` counts on the stream's timeline,
``local_end_index`` in the buffer (capacity ``window_frames * tokens_per_frame``).

Positions (rotary, in frames) are not timeline frames: a frame ``f`` is at
position ``f - position_offset``. A plan whose ``position_offset`` is larger than
the state's is a **re-base** (SPEC section 13): every cached frame that is not a
pinned sink moves down by the difference, so the relative positions of the
frames kept never change. Sinks kept by a roll are pinned (they keep the
position they were written at); a recompute rebuild writes every context frame
at its new position, sinks included. ``slot_positions`` tracks the position of
every frame slot of the buffer, so each rank can check a re-base before
applying it.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from protocol import CallKind, ChunkId, canonical_bytes, digest_bytes

from ppstage.config import CacheGeometry
from ppstage.errors import CallCountMismatch, IllegalRebase, IllegalTransition

__all__ = [
    "CacheGeometry",
    "CacheLifecycle",
    "CallKind",
    "ChunkWindow",
    "LifecyclePlan",
    "LifecycleState",
    "RecomputeWindow",
]


class LifecyclePlan(Protocol):
    """The plan fields the lifecycle reads (``ChunkPlan`` and ``InferEnvelope`` both fit)."""

    call_id: int
    chunk_index: int
    cache_epoch: int
    current_start_frame: int
    init_cache: bool
    reset_kv_cache: bool
    reset_crossattn_cache: bool
    do_kv_recompute: bool
    num_denoise_steps: int
    expected_generator_calls: int
    kv_cache_attention_bias: float
    context_frame_indices: tuple[int, ...]
    recompute_mode: str
    anchor_mode: str
    position_offset: int


class RecomputeWindow(msgspec.Struct, frozen=True, kw_only=True):
    """The cleared cache is rebuilt at ``[0, local_end)`` from these timeline frames.

    ``positions`` are their rotary positions (``frame - position_offset``).
    """

    frame_positions: tuple[int, ...]
    local_end: int
    positions: tuple[int, ...] = ()


class ChunkWindow(msgspec.Struct, frozen=True, kw_only=True):
    """What the tensor cache must do for one chunk, derived from plan + state.

    Order of application: ``reset_kv`` (zero), ``reset_crossattn``, the
    recompute rebuild (if any), the roll (shift the tokens after the sinks left
    by ``roll_tokens``), then every denoise call writes ``[write_start, write_end)``
    and attends to ``[0, write_end)``. ``bias_keys`` is the buffer range whose
    scores get ``log(attention_bias)``: after the first frame, before the chunk.

    Positions: the chunk's frames are at rotary positions ``position_start + i``.
    After the roll, a re-base rotates the cached keys ``rebase_keys`` (buffer
    tokens, the non-sink frames kept) back by ``rebase_shift`` positions; zero
    when there is no re-base or when the rebuild writes the new positions anyway.
    """

    cache_epoch: int
    call_id: int
    chunk_index: int
    current_start_frame: int
    reset_kv: bool
    reset_crossattn: bool
    recompute: RecomputeWindow | None
    roll_tokens: int
    sink_tokens: int
    write_start: int
    write_end: int
    global_start: int
    global_end: int
    attention_bias: float
    bias_keys: tuple[int, int]
    position_offset: int = 0
    position_start: int = 0
    rebase_shift: int = 0
    rebase_keys: tuple[int, int] = (0, 0)

    @property
    def id(self) -> ChunkId:
        return ChunkId.of(self)


class LifecycleState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that must be identical on every generator rank.

    ``cache_epoch == -1`` means no hard cut has happened yet (no stream).
    """

    cache_epoch: int = -1
    last_call_id: int = -1
    last_chunk_index: int = -1
    current_start_frame: int = 0
    next_start_frame: int = 0
    global_end_index: int = 0
    local_end_index: int = 0
    crossattn_is_init: bool = False
    in_chunk: bool = False
    calls_made: int = 0
    expected_calls: int = 0
    recompute_planned: bool = False
    num_denoise_steps: int = 0
    attention_bias: float = 1.0
    recompute_mode: str = "none"
    anchor_mode: str = "none"
    position_offset: int = 0
    slot_positions: tuple[int, ...] = ()  # rotary position of each frame slot of the buffer

    @property
    def last_chunk(self) -> ChunkId | None:
        """The identity of the chunk begun last (None before the first one)."""
        if self.last_call_id < 0:
            return None
        return ChunkId(self.last_call_id, self.last_chunk_index, self.cache_epoch)


class CacheLifecycle:
    """Applies plans to a ``LifecycleState``, refusing every illegal transition."""

    def __init__(self, geometry: CacheGeometry) -> None:
        if geometry.window_frames < geometry.sink_frames + geometry.chunk_frames:
            raise ValueError("window must hold the sinks and one chunk")
        self.geometry = geometry
        self._state = LifecycleState()
        self._window: ChunkWindow | None = None

    # -- read side ---------------------------------------------------------
    @property
    def state(self) -> LifecycleState:
        return self._state

    @property
    def window(self) -> ChunkWindow:
        """The window of the chunk in progress."""
        if self._window is None or not self._state.in_chunk:
            raise IllegalTransition("no chunk in progress")
        return self._window

    def digest(self) -> str:
        """Canonical digest of the state (identical on every rank that agrees)."""
        return digest_bytes(canonical_bytes(self._state))

    # -- transitions -------------------------------------------------------
    def begin_chunk(self, plan: LifecyclePlan) -> ChunkWindow:
        """Start the chunk ``plan`` describes: check the transition, decide resets, rebuild and roll.

        Parameters
        ----------
        plan : LifecyclePlan
            A ``ChunkPlan`` (rank 0, the reference) or an ``InferEnvelope`` (stages).
            Read: ``call_id`` / ``chunk_index`` (each strictly greater than the
            last chunk's), ``cache_epoch`` (+1 exactly at a hard cut, else
            unchanged), ``current_start_frame`` (latent frames; 0 at a hard cut,
            else where the last chunk ended), the reset and recompute flags,
            ``num_denoise_steps``, ``expected_generator_calls``
            (``(1 if do_kv_recompute else 0) + num_denoise_steps``),
            ``context_frame_indices`` (latent frames, strictly increasing,
            before the chunk, iff recompute) and ``kv_cache_attention_bias``
            (a positive float; 1.0 = no bias).

        Returns
        -------
        ChunkWindow
            What the tensor cache must do, all indices in tokens: the resets,
            the recompute rebuild ``[0, recompute.local_end)``, ``roll_tokens``
            to evict after the sinks, the write window ``[write_start,
            write_end)`` every call of the chunk overwrites and ``bias_keys``.
            Also kept as ``self.window`` until ``end_chunk``.

        Raises
        ------
        IllegalTransition
            A chunk is still in progress, or the plan breaks a rule of SPEC
            section 3 (ids not increasing, epoch skip, wrong start frame,
            context that does not fit the window, eviction of sink frames).
            The state is unchanged then.
        """
        window, state = self._derive(plan, plan.position_offset)
        self._state = state
        self._window = window
        return window

    def rebase_offset(self, plan: LifecyclePlan) -> int:
        """The ``position_offset`` a re-base at ``plan``'s boundary takes (the planner's rule).

        Pure: nothing is applied. ``plan`` is read as if it kept the current
        offset. The frames that move (every cached frame but the pinned sinks,
        and the chunk) are packed down so that the oldest lands right after the
        pinned sinks' count: position ``pinned`` (0 after a rebuild, which pins
        nothing). Returns the current offset when nothing can move down.
        """
        offset = self._state.position_offset
        window, state = self._derive(plan, offset, check_table=False)
        pinned = 0 if window.recompute is not None else window.sink_tokens // self.geometry.tokens_per_frame
        moved = [*state.slot_positions[pinned:], window.position_start]
        return offset + max(0, min(moved) - pinned)

    def _derive(
        self, plan: LifecyclePlan, offset: int, *, check_table: bool = True
    ) -> tuple[ChunkWindow, LifecycleState]:
        """The window and the in-chunk state ``plan`` leads to, or a typed refusal. Pure."""
        s, g = self._state, self.geometry
        tpf = g.tokens_per_frame
        chunk = ChunkId.of(plan)

        def refuse(text: str) -> None:
            raise IllegalTransition(text, chunk=chunk)

        def refuse_rebase(text: str) -> None:
            raise IllegalRebase(text, chunk=chunk)

        if s.in_chunk:
            if offset != s.position_offset:
                refuse_rebase(
                    f"re-base to offset {offset} while chunk {s.last_chunk_index} is in progress: "
                    "a re-base happens only at a chunk boundary"
                )
            refuse("begin_chunk while a chunk is still in progress")
        if plan.call_id <= s.last_call_id:
            refuse(f"call_id {plan.call_id} not after {s.last_call_id} (applied twice?)")
        if plan.chunk_index <= s.last_chunk_index:
            refuse(f"chunk_index {plan.chunk_index} not after {s.last_chunk_index}")
        if plan.expected_generator_calls != (1 if plan.do_kv_recompute else 0) + plan.num_denoise_steps:
            refuse("expected_generator_calls inconsistent with the plan bits")
        if plan.reset_kv_cache != plan.init_cache:
            refuse("the KV cache is reset exactly at a hard cut")
        if offset < 0:
            refuse_rebase(f"position offset {offset} is negative")

        if plan.init_cache:
            if plan.cache_epoch != s.cache_epoch + 1:
                refuse(f"hard cut must move epoch {s.cache_epoch} -> {s.cache_epoch + 1}")
            if plan.current_start_frame != 0 or plan.do_kv_recompute:
                refuse("a hard cut starts at frame 0 without recompute")
            if not plan.reset_crossattn_cache:
                refuse("a hard cut also resets the cross-attention cache")
            if offset != 0:
                refuse_rebase(f"a hard cut restarts positions at offset 0, not {offset}")
            global_end, local_end = 0, 0
            positions: tuple[int, ...] = ()
        else:
            if s.cache_epoch < 0:
                refuse("first chunk of a stream must be a hard cut (init_cache)")
            if plan.cache_epoch != s.cache_epoch:
                refuse(f"epoch {plan.cache_epoch} without a hard cut (current {s.cache_epoch})")
            if plan.current_start_frame != s.next_start_frame:
                refuse(
                    f"current_start_frame {plan.current_start_frame} != expected {s.next_start_frame}"
                )
            if offset < s.position_offset:
                refuse_rebase(
                    f"position offset {offset} below the current {s.position_offset}: "
                    "a re-base only moves positions down"
                )
            global_end, local_end = s.global_end_index, s.local_end_index
            positions = s.slot_positions
        shift = offset - s.position_offset if not plan.init_cache else 0

        recompute = None
        if plan.do_kv_recompute:
            ctx = tuple(plan.context_frame_indices)
            if not ctx or list(ctx) != sorted(set(ctx)) or ctx[0] < 0:
                refuse("recompute needs strictly increasing context frame indices")
            if ctx[-1] >= plan.current_start_frame:
                refuse("context frames must precede the chunk")
            if len(ctx) + g.chunk_frames > g.window_frames:
                refuse(f"{len(ctx)} context frames + chunk exceed the window")
            if ctx[0] < offset:
                refuse_rebase(f"context frame {ctx[0]} would sit at negative position {ctx[0] - offset}")
            local_end = len(ctx) * tpf
            global_end = (ctx[-1] + 1) * tpf
            positions = tuple(f - offset for f in ctx)
            recompute = RecomputeWindow(frame_positions=ctx, local_end=local_end, positions=positions)
        elif plan.context_frame_indices:
            refuse("context frames without a planned recompute")

        # Roll decision: derived from indices only, identical on every rank.
        roll = max(0, local_end + g.chunk_tokens - g.capacity)
        if roll > local_end - min(g.sink_tokens, local_end):
            refuse("eviction would have to drop sink frames")
        write_start = local_end - roll
        write_end = write_start + g.chunk_tokens
        global_start = plan.current_start_frame * tpf
        sink_tokens = min(g.sink_tokens, write_start)
        pinned = sink_tokens // tpf
        positions = positions[:pinned] + positions[pinned + roll // tpf :]

        # Re-base of the frames the roll kept (a rebuild already wrote the new positions).
        rebase_shift = shift if recompute is None and write_start > sink_tokens else 0
        if rebase_shift:
            moved = tuple(p - rebase_shift for p in positions[pinned:])
            if min(moved) < 0:
                refuse_rebase(
                    f"re-base by {rebase_shift} would move a cached frame to position {min(moved)}"
                )
            positions = positions[:pinned] + moved
        position_start = plan.current_start_frame - offset
        if position_start < 0:
            refuse_rebase(f"chunk at frame {plan.current_start_frame} below offset {offset}")
        last = position_start + g.chunk_frames - 1
        if check_table and g.max_positions is not None and last >= g.max_positions:
            refuse(f"chunk reaches position {last}, past the positional table ({g.max_positions})")
        window = ChunkWindow(
            cache_epoch=plan.cache_epoch,
            call_id=plan.call_id,
            chunk_index=plan.chunk_index,
            current_start_frame=plan.current_start_frame,
            reset_kv=plan.init_cache,
            reset_crossattn=plan.reset_crossattn_cache,
            recompute=recompute,
            roll_tokens=roll,
            sink_tokens=sink_tokens,
            write_start=write_start,
            write_end=write_end,
            global_start=global_start,
            global_end=global_start + g.chunk_tokens,
            attention_bias=float(plan.kv_cache_attention_bias),
            bias_keys=(min(tpf, write_start), write_start),
            position_offset=offset,
            position_start=position_start,
            rebase_shift=rebase_shift,
            rebase_keys=(sink_tokens, write_start) if rebase_shift else (0, 0),
        )
        state = msgspec.structs.replace(
            s,
            cache_epoch=plan.cache_epoch,
            last_call_id=plan.call_id,
            last_chunk_index=plan.chunk_index,
            current_start_frame=plan.current_start_frame,
            global_end_index=global_end,
            local_end_index=local_end,
            crossattn_is_init=False if plan.reset_crossattn_cache else s.crossattn_is_init,
            in_chunk=True,
            calls_made=0,
            expected_calls=plan.expected_generator_calls,
            recompute_planned=plan.do_kv_recompute,
            num_denoise_steps=plan.num_denoise_steps,
            attention_bias=float(plan.kv_cache_attention_bias),
            recompute_mode=plan.recompute_mode,
            anchor_mode=plan.anchor_mode,
            position_offset=offset,
            slot_positions=positions,
        )
        return window, state

    def record_call(self, kind: CallKind) -> int:
        """Count one generator call of the chunk in progress, before it runs.

        Parameters
        ----------
        kind : {"recompute", "denoise"}
            ``"recompute"`` only as the first call of a chunk that planned one;
            ``"denoise"`` for each of the ``num_denoise_steps`` calls after it.

        Returns
        -------
        int
            The call's index within the chunk, from 0.

        Raises
        ------
        IllegalTransition
            No chunk is in progress, or ``kind`` is unknown.
        CallCountMismatch
            The call is not the one planned next (an unplanned or late
            recompute, a denoise before the planned recompute, one call more
            than ``expected_generator_calls``).
        """
        s = self._state
        chunk = s.last_chunk
        if not s.in_chunk:
            raise IllegalTransition(f"{kind} call outside a chunk", chunk=chunk)
        if kind == "recompute":
            if not s.recompute_planned or s.calls_made != 0:
                raise CallCountMismatch("recompute call not planned at this point", chunk=chunk)
        elif kind == "denoise":
            if s.recompute_planned and s.calls_made == 0:
                raise CallCountMismatch("denoise call before the planned recompute", chunk=chunk)
            if s.calls_made >= s.expected_calls:
                raise CallCountMismatch(
                    f"call {s.calls_made + 1} exceeds the planned {s.expected_calls}", chunk=chunk
                )
        else:
            raise IllegalTransition(f"unknown call kind {kind!r}", chunk=chunk)
        self._state = msgspec.structs.replace(s, calls_made=s.calls_made + 1, crossattn_is_init=True)
        return s.calls_made

    def end_chunk(self) -> LifecycleState:
        """Close the chunk in progress and advance the cache pointers, once per chunk.

        Returns
        -------
        LifecycleState
            The new state: ``local_end_index`` / ``global_end_index`` (tokens)
            at the end of the chunk's write window, ``next_start_frame`` one
            chunk on. Its ``digest()`` is what every rank compares.

        Raises
        ------
        IllegalTransition
            No chunk is in progress.
        CallCountMismatch
            Fewer generator calls ran than the plan's ``expected_generator_calls``
            (the chunk stays open).
        """
        s = self._state
        chunk = s.last_chunk
        if not s.in_chunk or self._window is None:
            raise IllegalTransition("end_chunk without a chunk in progress", chunk=chunk)
        if s.calls_made != s.expected_calls:
            raise CallCountMismatch(
                f"chunk ended after {s.calls_made} generator calls, planned {s.expected_calls}", chunk=chunk
            )
        w = self._window
        written = tuple(range(w.position_start, w.position_start + self.geometry.chunk_frames))
        self._state = msgspec.structs.replace(
            s,
            in_chunk=False,
            local_end_index=w.write_end,
            global_end_index=w.global_end,
            next_start_frame=w.current_start_frame + self.geometry.chunk_frames,
            slot_positions=s.slot_positions + written,
        )
        return self._state
