"""``Planner``: rank 0's maker of every lifecycle decision.

Intents (hard cut, prompt update, attention-bias change, step-list change,
stream start) queue up and take effect at the next chunk boundary, never in
the middle of a chunk. Before the positional (RoPE) table would run out it
plans a re-base at that chunk boundary (``cache.on_position_overflow =
"rebase"``, the default) or forces a hard cut (``"cut"``); it applies the
recompute mode and cadence, and emits immutable ``ChunkPlan``s with strictly
increasing ``call_id`` / ``chunk_index``.

The planner keeps a ``CacheLifecycle`` of its own, fed every plan it emits
(the same plans every generator rank applies), to read which positions the
cache will hold at the next boundary: ``CacheLifecycle.rebase_offset`` gives
the offset, the planner only stamps it. Every plan is thereby also checked
as a legal transition before anything is sent. Pure: no I/O, no clocks;
memory is constant over a stream of any length.
"""

from __future__ import annotations

from typing import Union

import msgspec

from protocol import ANCHOR_FOR_MODE, ChunkId

from ppstage.config import PPStageConfig, step_list_problem
from ppstage.core.lifecycle import CacheLifecycle
from ppstage.core.plan import ChunkPlan
from ppstage.errors import PPStageError


__all__ = [
    "AttentionBiasChange",
    "HardCut",
    "Intent",
    "Planner",
    "PlannerError",
    "PromptUpdate",
    "StepListChange",
    "StreamStart",
]


class HardCut(msgspec.Struct, frozen=True, tag="hard_cut"):
    pass


class StreamStart(msgspec.Struct, frozen=True, tag="stream_start"):
    prompt: str


class PromptUpdate(msgspec.Struct, frozen=True, tag="prompt_update"):
    prompt: str


class AttentionBiasChange(msgspec.Struct, frozen=True, tag="attention_bias"):
    bias: float


class StepListChange(msgspec.Struct, frozen=True, tag="step_list"):
    steps: tuple[int, ...]


Intent = Union[HardCut, StreamStart, PromptUpdate, AttentionBiasChange, StepListChange]


class PlannerError(PPStageError):
    """An intent or request the planner cannot honour (typed, never silent)."""


class Planner:
    """Rank 0's maker of every lifecycle decision (see the module docstring).

    Parameters
    ----------
    config : PPStageConfig
        Chunk size, RoPE limit, recompute mode and cadence, default step list and seed.
    """

    def __init__(self, config: PPStageConfig) -> None:
        self.config = config
        self._pending: list[Intent] = []
        self._next_call_id = 0
        self._next_chunk_index = 0
        self._epoch = -1
        self._next_start = 0
        self._chunk_in_epoch = 0
        self._prompt: str | None = None
        self._bias = 1.0
        self._steps = tuple(config.denoise.step_list)
        self._offset = 0
        self._cache = CacheLifecycle(config.cache_geometry())

    @property
    def position_offset(self) -> int:
        return self._offset

    @property
    def cache_epoch(self) -> int:
        return self._epoch

    def submit(self, intent: Intent) -> None:
        """Queue an intent for the next chunk boundary; rejects bad values now."""
        if isinstance(intent, AttentionBiasChange) and not (0.0 < intent.bias < float("inf")):
            raise PlannerError(f"attention bias must be positive and finite, got {intent.bias}")
        if isinstance(intent, StepListChange):
            problem = step_list_problem(intent.steps)
            if problem is not None:
                raise PlannerError(f"step list {problem}")
        if isinstance(intent, (StreamStart, PromptUpdate)) and not intent.prompt.strip():
            raise PlannerError("a prompt must not be empty")
        self._pending.append(intent)

    def next_chunk(self) -> ChunkPlan:
        """Apply the pending intents at this chunk boundary and plan the next chunk.

        A ``StreamStart`` or ``HardCut`` starts a new epoch (``init_cache``, frame 0);
        so does running out of the RoPE table (``forced_cut``). Otherwise the
        chunk continues the epoch, with a recompute every ``recompute.cadence``
        chunks unless the mode is ``r1``. Pure: no I/O, no clock.

        Returns
        -------
        ChunkPlan
            Immutable. ``call_id`` and ``chunk_index`` strictly increase;
            ``current_start_frame`` and ``context_frame_indices`` are in latent
            frames; ``denoising_step_list`` holds integer timesteps in
            ``(0, 1000]``, strictly decreasing; ``expected_generator_calls`` is
            ``(1 if do_kv_recompute else 0) + num_denoise_steps``.

        Raises
        ------
        PlannerError
            No stream: no ``StreamStart`` was ever submitted.
        """
        cut = False
        prompt_changed = False
        for intent in self._pending:
            if isinstance(intent, (StreamStart, HardCut)):
                cut = True
                if isinstance(intent, StreamStart):
                    self._prompt = intent.prompt
            elif isinstance(intent, PromptUpdate):
                self._prompt = intent.prompt
                prompt_changed = True
            elif isinstance(intent, AttentionBiasChange):
                self._bias = float(intent.bias)
            elif isinstance(intent, StepListChange):
                self._steps = tuple(intent.steps)
        self._pending.clear()
        if self._prompt is None:
            raise PlannerError("no stream: submit StreamStart(prompt) before planning chunks")

        cfg = self.config
        frames = cfg.cache.chunk_frames
        forced = False
        overflow = self._overflows()
        if self._epoch < 0:
            cut = True
        elif not cut and self._overflow_forces_cut():
            cut = forced = True
        if cut:
            self._epoch += 1
            self._next_start = 0
            self._chunk_in_epoch = 0
            self._offset = 0

        start = self._next_start
        mode = cfg.recompute.mode
        recompute = (
            mode != "r1"
            and self._chunk_in_epoch > 0
            and self._chunk_in_epoch % cfg.recompute.cadence == 0
        )
        ctx: tuple[int, ...] = ()
        source = "none"
        anchor: int | None = None
        if recompute:
            ctx, source, anchor = self._context(start)
        steps = self._steps
        plan = ChunkPlan(
            call_id=self._next_call_id,
            chunk_index=self._next_chunk_index,
            cache_epoch=self._epoch,
            current_start_frame=start,
            num_frames=frames,
            init_cache=cut,
            reset_kv_cache=cut,
            reset_crossattn_cache=cut or prompt_changed,
            do_kv_recompute=recompute,
            num_denoise_steps=len(steps),
            expected_generator_calls=(1 if recompute else 0) + len(steps),
            kv_cache_attention_bias=self._bias,
            denoising_step_list=steps,
            recompute_mode=mode,
            anchor_mode=ANCHOR_FOR_MODE[mode],
            context_frame_indices=ctx,
            context_source=source,  # type: ignore[arg-type]
            anchor_frame=anchor,
            prompt=self._prompt,
            base_seed=cfg.denoise.base_seed,
            forced_cut=forced,
            position_offset=self._offset,
        )
        if overflow and not cut:
            plan = self._rebase(plan)
        lc = self._cache
        lc.begin_chunk(plan)
        for i in range(plan.expected_generator_calls):
            lc.record_call("recompute" if plan.do_kv_recompute and i == 0 else "denoise")
        lc.end_chunk()
        self._next_call_id += 1
        self._next_chunk_index += 1
        self._next_start = start + frames
        self._chunk_in_epoch += 1
        return plan

    def _rebase(self, plan: ChunkPlan) -> ChunkPlan:
        """Stamp the re-base offset on ``plan``: the window packed to the table's bottom."""
        offset = self._cache.rebase_offset(plan)
        rc = self.config.recompute
        if rc.mode != "r1":
            # A later rebuild writes its context from frame (its start - decoded_buffer_frames)
            # on, at frame - offset: the offset must never pass the oldest frame it may use.
            offset = min(offset, max(self._offset, plan.end_frame - rc.decoded_buffer_frames))
        table = self.config.model.rope_max_frames
        if plan.end_frame - offset > table:  # PPStageConfig.rebase_span makes this unreachable
            raise PlannerError(
                f"a re-base at frame {plan.current_start_frame} still needs "
                f"{plan.end_frame - offset} positions, the table has {table}",
                chunk=plan.id,
            )
        self._offset = offset
        return msgspec.structs.replace(plan, position_offset=offset, rebased=True)

    def control_ids(self) -> ChunkId:
        """Consume a call_id for a NOOP / SHUTDOWN / ERROR message (the latest chunk's index and epoch)."""
        ids = ChunkId(
            call_id=self._next_call_id,
            chunk_index=max(0, self._next_chunk_index - 1),
            cache_epoch=max(0, self._epoch),
        )
        self._next_call_id += 1
        return ids

    def next_boundary(self) -> tuple[int, int]:
        """``(chunk_index, cache_epoch)`` the next ``next_chunk`` will plan, pending intents included.

        What the service answers a live intent with: the intent applies exactly
        there. Mirrors ``next_chunk``'s cut decision (requested or forced) without
        planning anything; ``tests/test_service_units.py`` checks the two agree.
        """
        cut = self._epoch < 0 or any(isinstance(i, (StreamStart, HardCut)) for i in self._pending)
        # A forced cut moves the epoch too; under "rebase" the boundary re-bases in the same epoch.
        cut = cut or self._overflow_forces_cut()
        return self._next_chunk_index, self._epoch + (1 if cut else 0)

    def _overflows(self) -> bool:
        """The next chunk, at the current offset, would pass the positional (RoPE) table."""
        cfg = self.config
        return self._next_start + cfg.cache.chunk_frames - self._offset > cfg.model.rope_max_frames

    def _overflow_forces_cut(self) -> bool:
        """The next chunk would pass the table and the policy is ``"cut"`` (SPEC §13)."""
        return self._overflows() and self.config.cache.on_position_overflow == "cut"

    def _context(self, start: int) -> tuple[tuple[int, ...], str, int]:
        """Context frames for a recompute at ``start``: anchor + latest latents.

        Early regime (fewer than ``decoded_buffer_frames`` frames so far): the
        anchor is the epoch's first latent frame, so no decode is awaited.
        Steady state: the anchor is the oldest frame stage 0 still holds decoded,
        frame ``start - decoded_buffer_frames``.
        """
        rc = self.config.recompute
        recent = tuple(range(max(0, start - (rc.context_frames - 1)), start))
        if start < rc.decoded_buffer_frames:
            anchor, source = 0, "early"
        else:
            anchor = start - rc.decoded_buffer_frames
            source = "decoded" if rc.mode == "r0a" else "latent"
        ctx = tuple(sorted({anchor, *recent}))
        return ctx, source, anchor
