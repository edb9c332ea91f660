"""Fuzz (hypothesis, CI-sized): the config loader and the receive path get only typed errors, never a hang.

The frame decoder's own byte-level fuzzing (truncations, bit flips, mutations,
resealed garbage, random bytes) lives in test_codec.py; here the decoded
messages also go through ``validate`` as a receiver runs it, and the config
loader (TOML text -> ``PPStageConfig``, drills included) is fed random and
mutated input. Long runs: ``tests/fuzz/fuzz_wire.py`` with atheris
(docs/reliability.md).
"""

from __future__ import annotations

import os
import tempfile
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppstage.config import ConfigError, PPStageConfig
from protocol import ProtocolError, decode_frame, encode_frame_bytes, validate
from wire_samples import sample_messages

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GEOMETRY = PPStageConfig().wire_geometry()
VALID_TOML = PPStageConfig().with_overrides(
    {"faults.drill": [{"kind": "stall_decode", "rank": 0, "chunk": 4, "ms": 0}]}
).to_toml()


def load_text(text: str) -> PPStageConfig | None:
    """``PPStageConfig.from_toml`` on ``text``; None when refused with a ConfigError."""
    fd, path = tempfile.mkstemp(suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        return PPStageConfig.from_toml(path)
    except ConfigError:
        return None
    except UnicodeEncodeError:
        return None  # not writable as a file at all: nothing to load
    finally:
        os.unlink(path)


@fuzz
@given(text=st.text(max_size=300))
def test_random_text_as_a_config_is_a_config_error_or_a_config(text):
    out = load_text(text)
    assert out is None or isinstance(out, PPStageConfig)


@fuzz
@given(blob=st.binary(max_size=200), prefix=st.sampled_from([b"", b"[model]\n", b"[[faults.drill]]\n"]))
def test_random_bytes_as_a_config_file_are_a_config_error(blob, prefix):
    fd, path = tempfile.mkstemp(suffix=".toml")
    try:
        os.write(fd, prefix + blob)
        os.close(fd)
        try:
            PPStageConfig.from_toml(path)
        except ConfigError:
            pass
    finally:
        os.unlink(path)


@st.composite
def mutated_toml(draw) -> str:
    lines = VALID_TOML.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["drop", "dup", "value", "garble"]))
        if kind == "drop":
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "value" and "=" in lines[i]:
            key = lines[i].split("=")[0]
            value = draw(st.sampled_from(["-1", "0", "1e308", "nan", "inf", '"x"', "[]", "true", "2.5", "-0.0",
                                          '{kind = "exit_rank", rank = 99}', "99999999999999999999"]))
            lines[i] = f"{key}= {value}"
        elif lines:
            s = lines[i]
            j = draw(st.integers(0, len(s)))
            lines[i] = s[:j] + draw(st.text(max_size=4)) + s[j:]
        if not lines:
            break
    return "\n".join(lines)


@fuzz
@given(text=mutated_toml())
def test_a_mutated_valid_config_loads_or_is_refused_with_a_config_error(text):
    out = load_text(text)
    if out is not None:  # whatever loads is self-consistent and round-trips
        assert PPStageConfig.from_dict(msgspec.to_builtins(out)) == out


drill_values = st.fixed_dictionaries(
    {"kind": st.one_of(st.sampled_from(["stall_decode", "exit_rank", "delay_result", "no_keepalives"]), st.text(max_size=6)),
     "rank": st.one_of(st.integers(-3, 9), st.floats(allow_nan=True), st.text(max_size=2)),
     "chunk": st.one_of(st.integers(-3, 10**12), st.none()),
     "ms": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**9))},
)


@fuzz
@given(drills=st.lists(drill_values, max_size=4))
def test_any_drill_list_is_accepted_only_when_every_drill_can_act_where_it_is_placed(drills):
    try:
        cfg = PPStageConfig.from_dict({"faults": {"drill": drills}})
    except ConfigError:
        return
    for d in cfg.faults.drill:
        assert 0 <= d.rank < cfg.topology.world_size and d.chunk >= 0 and 0 <= d.ms


@fuzz
@given(msg=st.sampled_from(sample_messages()), data=st.data())
def test_a_receiver_validating_any_decodable_mutation_gets_a_protocol_error_or_a_message(msg, data):
    frame = bytearray(encode_frame_bytes(msg))
    for _ in range(data.draw(st.integers(1, 3))):
        p = data.draw(st.integers(0, len(frame) - 1))
        frame[p] = data.draw(st.integers(0, 255))
    t0 = time.perf_counter()
    try:
        decoded = decode_frame(bytes(frame))
        validate(decoded, GEOMETRY)
    except ProtocolError:
        pass
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} escaped the receive path: {exc}")
    assert time.perf_counter() - t0 < 1.0  # never anything like a hang
