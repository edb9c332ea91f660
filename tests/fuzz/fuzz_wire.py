"""Long-run fuzzing with atheris (coverage-guided): the frame decoder + receiver checks, and the config loader.

Not collected by pytest (no ``test_`` prefix). Run for as long as you like::

    pip install atheris
    python tests/fuzz/fuzz_wire.py frames -max_total_time=3600 corpus/frames
    python tests/fuzz/fuzz_wire.py config -max_total_time=3600 corpus/config

Any exception other than ``protocol.ProtocolError`` (frames) or
``ppstage.config.ConfigError`` (config) is a finding: atheris stops and writes
the input as ``crash-<sha>``; replay it with ``python tests/fuzz/fuzz_wire.py
frames crash-<sha>``. A run slower than ``-timeout`` seconds on one input is a
hang finding. Seed the frames corpus with valid frames (``--seed-corpus``
writes every sample message of tests/wire_samples.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for wire_samples


def fuzz_frames(data: bytes) -> None:
    from protocol import ProtocolError, decode_frame, validate

    from ppstage.config import PPStageConfig

    try:
        msg = decode_frame(data)
        validate(msg, PPStageConfig().wire_geometry())
    except ProtocolError:
        pass


def fuzz_config(data: bytes) -> None:
    from ppstage.config import ConfigError, PPStageConfig

    fd, path = tempfile.mkstemp(suffix=".toml")
    try:
        os.write(fd, data)
        os.close(fd)
        try:
            PPStageConfig.from_toml(path)
        except ConfigError:
            pass
    finally:
        os.unlink(path)


def seed_corpus(directory: str) -> None:
    from protocol import encode_frame_bytes
    from wire_samples import sample_messages

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i, msg in enumerate(sample_messages()):
        (out / f"sample{i}").write_bytes(encode_frame_bytes(msg))


def main() -> None:
    target = sys.argv.pop(1) if len(sys.argv) > 1 else "frames"
    if target == "--seed-corpus":
        seed_corpus(sys.argv[1] if len(sys.argv) > 1 else "corpus/frames")
        return
    import atheris

    with atheris.instrument_imports():
        import protocol  # noqa: F401
        import ppstage.config  # noqa: F401
    atheris.Setup(sys.argv, {"frames": fuzz_frames, "config": fuzz_config}[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
