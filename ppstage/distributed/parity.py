"""Start-up parity handshake: every rank proves it resolved the same settings.

Each rank publishes a ``ParityHello`` (its rank and ``settings``: the flat config,
the runtime environment and caller-supplied flags) as a canonical frame
(``protocol.encode_frame_bytes``: msgspec, fixed field order, checksummed; never
pickle). Two ``all_gather`` calls on the world group move the frames: first the
lengths, then every frame padded to the longest. Every rank then decodes and
compares all of them, key by key, and on any difference every rank raises the
same ``ParityError``.

Ordering: this is the first collective of a process, before ``build_groups``.
Every decision between the two collectives is made from gathered data that is
identical on every rank, so either all ranks issue the second collective or
none does: a mismatch never leaves a rank waiting in a collective.
"""

from __future__ import annotations

import platform
from typing import Any, Mapping

import msgspec

from protocol import (
    HEADER_SIZE,
    MAX_META_BYTES,
    PROTOCOL_VERSION,
    ParityHello,
    ProtocolError,
    decode_frame,
    encode_frame_bytes,
)

from ppstage import __version__
from ppstage.config import PPStageConfig
from ppstage.errors import ChannelDead, ParityError
from ppstage.distributed.supervision import restart_generation
from ppstage.distributed.topology import ProcessGroups, Role

__all__ = ["compare_settings", "environment_settings", "parity_handshake", "parity_settings"]

MAX_HELLO_BYTES = HEADER_SIZE + MAX_META_BYTES


def environment_settings(config: PPStageConfig) -> dict[str, str]:
    """Versions and world facts that must match on every rank (``env.*`` keys)."""
    import torch
    import torch.distributed as dist

    out = {
        "env.backend": config.topology.backend,
        "env.torch": str(torch.__version__),
        "env.python": platform.python_version(),
        "env.ppstage": __version__,
        "env.protocol": str(PROTOCOL_VERSION),
        "env.msgspec": msgspec.__version__,
        # torchrun's restart count: a rank of another generation is never a peer.
        "env.restart_generation": str(restart_generation()),
    }
    if dist.is_initialized():
        out["env.world_size"] = str(dist.get_world_size())
    return out


def parity_settings(config: PPStageConfig, extra: Mapping[str, str]) -> dict[str, str]:
    """``config.flat()`` + ``environment_settings`` + ``extra``, as compared.

    ``extra`` carries every other flag that can add or remove a communication
    call. Its keys must not shadow config or ``env.*`` keys: a shadowed key
    could hide a mismatch, so that is refused (on every rank alike, since the
    keys come from code, not from rank-local values).
    """
    settings = {**config.flat(), **environment_settings(config)}
    clash = sorted(set(settings) & set(extra))
    if clash:
        raise ValueError(f"parity extra keys shadow built-in keys: {clash}")
    settings.update({str(k): str(v) for k, v in extra.items()})
    return settings


def compare_settings(by_rank: Mapping[int, Mapping[str, str]]) -> dict[str, dict[str | None, list[int]]]:
    """Every key whose value is not the same on every rank.

    Returns ``key -> {value -> ranks}`` (value None: the rank lacks the key).
    """
    keys = sorted(set().union(*(s.keys() for s in by_rank.values()))) if by_rank else []
    diffs: dict[str, dict[str | None, list[int]]] = {}
    for key in keys:
        groups: dict[str | None, list[int]] = {}
        for rank in sorted(by_rank):
            groups.setdefault(by_rank[rank].get(key), []).append(rank)
        if len(groups) > 1:
            diffs[key] = groups
    return diffs


def _report(diffs: Mapping[str, Mapping[str | None, list[int]]]) -> str:
    lines = [f"start-up parity failed: {len(diffs)} setting(s) differ between ranks"]
    for key, groups in diffs.items():
        parts = [
            f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))} = "
            + ("<missing>" if value is None else value)
            for value, ranks in groups.items()
        ]
        lines.append(f"  {key}: " + "; ".join(parts))
    return "\n".join(lines)


def parity_handshake(
    config: PPStageConfig,
    role: Role,
    groups: ProcessGroups | None,
    extra: Mapping[str, str],
) -> None:
    """Compare every rank's settings; raise ``ParityError`` on every rank if any differ.

    Run it right after ``init_process_group`` and before any other collective
    (``groups`` may be None then: only the world group is used). Raises
    ``ParityError`` naming each differing key with the ranks and values per
    value, ``ChannelDead`` if a collective fails (e.g. a rank never joined
    within the process-group timeout).
    """
    import torch
    import torch.distributed as dist

    world = groups.world if groups is not None else dist.group.WORLD
    device = torch.device("cpu")
    if config.topology.backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())

    hello = ParityHello(
        call_id=0, chunk_index=0, cache_epoch=0, rank=role.rank, settings=parity_settings(config, extra)
    )
    frame = encode_frame_bytes(hello)
    size = dist.get_world_size(world)

    try:
        length = torch.tensor([len(frame)], dtype=torch.int64, device=device)
        lengths = [torch.zeros_like(length) for _ in range(size)]
        dist.all_gather(lengths, length, group=world)
        sizes = [int(t.item()) for t in lengths]
        # Same gathered sizes on every rank -> same decision on every rank.
        if max(sizes) > MAX_HELLO_BYTES or min(sizes) < HEADER_SIZE:
            raise ParityError(f"start-up parity failed: hello frame sizes {sizes} out of bounds")
        longest = max(sizes)
        buf = torch.zeros(longest, dtype=torch.uint8, device=device)
        buf[: len(frame)] = torch.frombuffer(bytearray(frame), dtype=torch.uint8).to(device)
        frames = [torch.zeros_like(buf) for _ in range(size)]
        dist.all_gather(frames, buf, group=world)
    except ParityError:
        raise
    except Exception as exc:
        raise ChannelDead(f"start-up parity collective failed on rank {role.rank}: {exc}") from exc

    by_rank: dict[int, dict[str, str]] = {}
    for slot, (n, t) in enumerate(zip(sizes, frames)):
        try:
            peer = decode_frame(t[:n].cpu().numpy().tobytes())
        except ProtocolError as exc:
            raise ParityError(f"start-up parity failed: rank {slot}'s hello is undecodable: {exc}") from exc
        if not isinstance(peer, ParityHello) or peer.rank != slot:
            raise ParityError(f"start-up parity failed: slot {slot} holds {_describe(peer)}")
        by_rank[slot] = dict(peer.settings)

    diffs = compare_settings(by_rank)
    if diffs:
        err = ParityError(_report(diffs))
        err.differences = diffs  # type: ignore[attr-defined]
        raise err


def _describe(msg: Any) -> str:
    rank = getattr(msg, "rank", None)
    return f"a {type(msg).__name__} from rank {rank}"
