"""Replaying recorded runs: ``verify`` against the reference, ``bisect`` a divergence.

A replay starts at an ``init_cache`` chunk (the KV cache is never
checkpointed, so nothing before an epoch boundary can be rebuilt). From there
every recorded plan of rank 0 is run, in call order, through the
single-process reference pipeline with the recorded config; for each chunk
the replayer rebuilds phase A's tensors and compares, field by field:

| field | recorded in | replayed |
|---|---|---|
| ``envelope.<lifecycle field>`` | rank 0's sent INFER | the plan's value |
| ``input.<tensor>`` | the INFER's tensor spec digests | digest of the rebuilt tensor |
| ``state_digest`` | rank 0's plan record (shadow lifecycle), every generator rank's chunk record, every stage report | the reference lifecycle after the chunk |
| ``output_digest`` | rank 0's received result | digest of the reference ``latents_out`` |
| ``generator_calls`` | the result | the reference's call count |

With tensor parallelism (``tp > 1``) a stage sums partial outputs in another
order than the reference: outputs agree within 1e-4, not bitwise, and so do
tensors derived from them (recompute context). The reference replay then
compares lifecycle fields, plan-derived inputs and state digests only
(``ReplayReport.bitwise`` is False); ``--pipeline`` re-runs with the same
mesh and compares everything bitwise.

``verify`` stops at the first mismatch (``ReplayMismatch``); ``bisect`` runs
every chunk and names the first chunk and the ranks whose recorded state
departs from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from protocol import InferEnvelope, ProtocolError

from ppstage.core.plan import ChunkPlan
from ppstage.replay.errors import ReplayError, ReplayMismatch
from ppstage.replay.runlog import RunLogs

ENVELOPE_FIELDS = (
    "chunk_index", "cache_epoch", "current_start_frame", "init_cache", "reset_kv_cache",
    "reset_crossattn_cache", "do_kv_recompute", "num_denoise_steps", "expected_generator_calls",
    "kv_cache_attention_bias", "base_seed", "recompute_mode", "anchor_mode", "context_frame_indices",
)


@dataclass
class Departure:
    """One recorded value that differs from the replayed one."""

    where: str  # "rank 0 (stage 0)", "rank 2 (stage 2)", "result"
    field: str
    recorded: str
    replayed: str


@dataclass
class ChunkCheck:
    """What was compared for one chunk, and what differed."""

    chunk_index: int
    cache_epoch: int
    call_id: int
    compared: list[str] = field(default_factory=list)
    departures: list[Departure] = field(default_factory=list)
    result: str = "-"  # "match", "dropped (stale_epoch)", "no result recorded"

    @property
    def ok(self) -> bool:
        return not self.departures


@dataclass
class ReplayReport:
    start_call: int
    start_epoch: int
    bitwise: bool = True
    checks: list[ChunkCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def first_departure(self) -> tuple[ChunkCheck, Departure] | None:
        for c in self.checks:
            if c.departures:
                return c, _first_cause(c.departures)
        return None


def _first_cause(deps: list[Departure]) -> Departure:
    """Of several departures in one chunk, the one that explains the others.

    A rank's own state digest comes first: its output then differs as a
    consequence (and so does what it reports to rank 0).
    """
    order = {"state_digest": 0, "envelope": 1, "input": 2, "generator_calls": 3, "output_digest": 4}
    return min(deps, key=lambda d: (order.get(d.field.split(".")[0], 9), "result" in d.where))


def start_index(plans: list[ChunkPlan], from_epoch: int | None) -> int:
    """Index of the plan a replay starts at: an ``init_cache`` chunk (of ``from_epoch``, else the first)."""
    for i, p in enumerate(plans):
        if p.init_cache and (from_epoch is None or p.cache_epoch == from_epoch):
            return i
    epochs = sorted({p.cache_epoch for p in plans if p.init_cache})
    want = f"epoch {from_epoch}" if from_epoch is not None else "any epoch"
    raise ReplayError(
        f"no init_cache chunk of {want} in rank 0's log (epoch boundaries recorded: {epochs}); a replay "
        "must start at an epoch boundary because the KV cache is never checkpointed"
    )


def replay(
    run: RunLogs,
    *,
    from_epoch: int | None = None,
    stop_at_first: bool = True,
    progress: Callable[[ChunkCheck], None] | None = None,
) -> ReplayReport:
    """Re-run rank 0's recorded plans through the reference pipeline and compare (see the module docstring).

    Raises ``ReplayMismatch`` at the first difference when ``stop_at_first``;
    otherwise records every difference in the report (``bisect``).
    """
    from ppstage.digests import tensor_digest
    from ppstage.model.reference import ReferencePipeline

    s0 = run.stage0
    config = s0.config()
    plans = s0.plans()
    if not plans:
        raise ReplayError(f"{s0.path}: rank 0 recorded no chunk plans")
    first = start_index(plans, from_epoch)
    shadow = {r.call_id: r.state_digest for r in s0.plan_records()}
    envelopes = s0.envelopes()
    results = s0.results()
    verdicts = {g.call_id: g.verdict for g in s0.gates if g.verdict not in ("emitted",)}
    chunk_recs = {
        lg.rank: {c.call_id: c for c in lg.chunks}
        for lg in run.by_rank().values()
        if lg.role in ("leader", "follower")
    }
    torch.set_num_threads(1)
    pipeline = ReferencePipeline(config, layer_ranges=config.layer_ranges(), device=_replay_device(config))
    bitwise = config.topology.tp == 1
    report = ReplayReport(plans[first].call_id, plans[first].cache_epoch, bitwise)
    _start_at(pipeline, plans[first])
    for plan in plans[first:]:
        check = ChunkCheck(plan.chunk_index, plan.cache_epoch, plan.call_id)
        report.checks.append(check)
        try:
            inputs = pipeline.stream.chunk_inputs(plan)
            sent = envelopes.get(plan.call_id)
            if sent is not None:
                _compare_envelope(check, plan, sent[1], inputs, tensor_digest, bitwise)
            latents_out = pipeline.generate(plan, inputs)
        except ProtocolError as exc:  # the reference refuses the recorded plan: as wrong as it gets
            check.departures.append(Departure("reference", "lifecycle", "a plan the run applied", f"{type(exc).__name__}: {exc}"))
            check.result = "REFUSED"
            if progress is not None:
                progress(check)
            if stop_at_first:
                _raise(plan, check)
            break
        state = pipeline.stages[0].state_digest()
        calls = pipeline.stages[0].lifecycle.state.calls_made
        out_digest = tensor_digest(latents_out)
        pipeline.stream.record_latents(plan, latents_out)
        pipeline.stream.decode(plan, latents_out)

        def same(where: str, fld: str, recorded: object, replayed: object) -> None:
            check.compared.append(fld)
            if recorded != replayed:
                check.departures.append(Departure(where, fld, str(recorded), str(replayed)))

        if plan.call_id in shadow:
            same("rank 0 (shadow lifecycle)", "state_digest", shadow[plan.call_id], state)
        for rank in sorted(chunk_recs):
            rec = chunk_recs[rank].get(plan.call_id)
            if rec is not None:
                same(f"rank {rank} (stage {rec.stage})", "state_digest", rec.state_digest, state)
        result = results.get(plan.call_id)
        verdict = verdicts.get(plan.call_id)
        if result is None:
            check.result = "no result recorded"
        elif not result.ok:
            check.result = f"error result: {result.error}"
        else:
            for s in result.stages:
                same(f"stage {s.stage} report", "state_digest", s.state_digest, state)
            same("result", "generator_calls", result.observed_generator_calls, calls)
            if bitwise:
                same("result", "output_digest", result.output_digest, out_digest)
            check.result = "match" if verdict in (None, "accepted") else f"match, {verdict}"
            if not check.ok:
                check.result = "MISMATCH"
        if progress is not None:
            progress(check)
        if stop_at_first and check.departures:
            _raise(plan, check)
    return report


def _raise(plan: ChunkPlan, check: ChunkCheck) -> None:
    d = _first_cause(check.departures)
    raise ReplayMismatch(
        f"chunk {plan.chunk_index} (epoch {plan.cache_epoch}, call {plan.call_id}): {d.where} "
        f"{d.field} recorded {d.recorded[:16]}, replay gives {d.replayed[:16]}",
        chunk=plan.id, where=d.where, field=d.field,
        recorded=d.recorded, replayed=d.replayed,
    )


def _replay_device(config) -> torch.device:
    """The device the recorded ranks computed on (``reference_device``): bytes match only there.

    Raises ``ReplayError`` when the run was recorded on a CUDA device this
    machine does not have: a CPU re-run would differ in the last bits and be
    reported as a mismatch that is not one.
    """
    from ppstage.distributed.devices import reference_device

    device = reference_device(config)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ReplayError(
            f"the run was recorded on {device} (runtime.device = {config.runtime.device!r}, backend "
            f"{config.topology.backend}); this machine has no such device, and a CPU re-run would not be bitwise"
        )
    return device


def _start_at(pipeline, plan: ChunkPlan) -> None:
    """Put the reference where a run stands just before ``plan``'s hard cut.

    A hard cut resets every cache and index, so the state after it depends
    only on the plan; the lifecycle merely insists the epoch moves by one and
    ids keep increasing, which this sets up (the caches are zeroed by the cut).
    """
    from ppstage.core.lifecycle import LifecycleState

    before = LifecycleState(
        cache_epoch=plan.cache_epoch - 1, last_call_id=plan.call_id - 1, last_chunk_index=plan.chunk_index - 1
    )
    for stage in pipeline.stages:
        stage.lifecycle._state = before


def _compare_envelope(check: ChunkCheck, plan: ChunkPlan, env: InferEnvelope, inputs, tensor_digest,
                      bitwise: bool) -> None:
    for name in ENVELOPE_FIELDS:
        recorded, replayed = getattr(env, name), getattr(plan, name)
        check.compared.append(f"envelope.{name}")
        if recorded != replayed:
            check.departures.append(Departure("rank 0 (envelope)", f"envelope.{name}", str(recorded), str(replayed)))
    rebuilt: dict[str, torch.Tensor] = {
        "latents_in": inputs.latents_in,
        "conditioning_embeds": inputs.conditioning,
        "denoising_step_list": inputs.step_list,
    }
    if inputs.context_frames is not None and bitwise:  # built from earlier outputs
        rebuilt["context_frames_override"] = inputs.context_frames
    for spec in env.tensors:
        tensor = rebuilt.get(spec.name)
        if spec.digest is None or tensor is None:
            continue
        check.compared.append(f"input.{spec.name}")
        got = tensor_digest(tensor.contiguous())
        if got != spec.digest:
            check.departures.append(Departure("rank 0 (envelope)", f"input.{spec.name}", spec.digest, got))


def bisect(run: RunLogs, *, from_epoch: int | None = None, progress=None) -> ReplayReport:
    """Replay every chunk without stopping; ``report.first_departure()`` names where the run first diverged."""
    return replay(run, from_epoch=from_epoch, stop_at_first=False, progress=progress)
