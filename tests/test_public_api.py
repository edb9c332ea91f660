"""The public API is frozen: a change to these names is deliberate (update the list here).

``protocol.__all__`` and the ``__all__`` of every public ppstage module a
contributor builds on. Private names (a leading underscore) and modules not
listed here (the actors, the CLI) may change freely.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC_API: dict[str, list[str]] = {
    "protocol": [
        "ACTION_CODES",
        "ANCHOR_FOR_MODE",
        "AnchorMode",
        "CallKind",
        "ChunkError",
        "ChunkId",
        "ChunkResult",
        "DTYPE_ITEMSIZE",
        "DigestMismatch",
        "Envelope",
        "ErrorEnvelope",
        "FramingError",
        "HEADER_SIZE",
        "Header",
        "HopTarget",
        "InferEnvelope",
        "InvariantViolation",
        "MAGIC",
        "MAX_META_BYTES",
        "MAX_TENSORS",
        "MetadataError",
        "NoopEnvelope",
        "PROTOCOL_VERSION",
        "ParityHello",
        "ProtocolError",
        "RECOMPUTE_MODES",
        "RecomputeMode",
        "ShutdownEnvelope",
        "StageHop",
        "StageReport",
        "TensorSpec",
        "TensorSpecError",
        "UnknownAction",
        "UnsupportedVersion",
        "WIRE_TYPES",
        "WireGeometry",
        "WireMessage",
        "action_of",
        "canonical_bytes",
        "check_tensor_digest",
        "check_tensor_spec",
        "decode_frame",
        "decode_metadata",
        "digest_bytes",
        "encode_frame",
        "encode_frame_bytes",
        "hop_tensor_name",
        "message_digest",
        "parse_header",
        "validate",
    ],
    "ppstage.errors": [
        "CallCountMismatch",
        "ChannelDead",
        "FutureResult",
        "GateError",
        "IllegalTransition",
        "MissingTensor",
        "OutOfOrderResult",
        "PPStageError",
        "ParityError",
        "RemoteStageError",
        "StateDivergence",
        "UnexpectedMessage",
        "UpstreamFailed",
        "WatchdogExpired",
    ],
    "ppstage.config": [
        "CacheConfig",
        "CacheGeometry",
        "ConfigError",
        "DenoiseConfig",
        "KeyDoc",
        "ModelConfig",
        "PPStageConfig",
        "RecomputeConfig",
        "RecomputeMode",
        "RuntimeConfig",
        "TopologyConfig",
        "key_docs",
        "step_list_problem",
    ],
    "ppstage.digests": [
        "byte_view",
        "tensor_digest",
    ],
    "ppstage.core.plan": [
        "ChunkPlan",
        "ContextSource",
    ],
    "ppstage.core.lifecycle": [
        "CacheGeometry",
        "CacheLifecycle",
        "CallKind",
        "ChunkWindow",
        "LifecyclePlan",
        "LifecycleState",
        "RecomputeWindow",
    ],
    "ppstage.core.planner": [
        "AttentionBiasChange",
        "HardCut",
        "Intent",
        "Planner",
        "PlannerError",
        "PromptUpdate",
        "StepListChange",
        "StreamStart",
    ],
    "ppstage.core.gate": [
        "DropReason",
        "EpochGate",
        "Outstanding",
        "Verdict",
    ],
    "ppstage.model": [
        "FlowMatchScheduler",
        "GeneratorBackend",
        "GeneratorStage",
        "RECOMPUTE_TIMESTEP",
        "Stage0Backend",
        "StageInputError",
        "ToyStage0",
        "ToyTextEncoder",
        "ToyVAE",
        "denoise_chunk",
        "denoise_step",
        "derive_seed",
        "initial_latents",
        "latent_shape",
        "step_noise",
        "tensor_digest",
    ],
    "ppstage.distributed.topology": [
        "MeshComm",
        "ProcessGroups",
        "Role",
        "WrongGroup",
        "build_groups",
        "link_group_keys",
        "links",
        "role_for",
    ],
    "ppstage.distributed.parity": [
        "compare_settings",
        "environment_settings",
        "parity_handshake",
        "parity_settings",
    ],
    "ppstage.distributed.transport": [
        "FrameReader",
        "FrameWriter",
        "IDLE_WAIT",
        "Inbound",
        "Mailbox",
        "MailboxInterrupted",
        "TERMINAL_ACTIONS",
        "TORCH_DTYPE",
        "Transport",
        "WIRE_DTYPE",
        "byte_view",
        "init_process_group",
        "make_spec",
        "preamble_capacity",
        "prepare_tensors",
        "rebuild",
        "tensor_digest",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC_API))
def test_public_names_are_frozen(module):
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == PUBLIC_API[module]
    assert len(mod.__all__) == len(set(mod.__all__))
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_protocol_errors_and_ppstage_errors_share_one_identity_carrying_base():
    from protocol import ChunkError, ChunkId, ProtocolError

    from ppstage.config import ConfigError
    from ppstage.errors import PPStageError, WatchdogExpired

    assert issubclass(ProtocolError, ChunkError) and issubclass(PPStageError, ChunkError)
    assert not issubclass(PPStageError, ProtocolError) and not issubclass(ProtocolError, PPStageError)
    assert issubclass(ConfigError, PPStageError)
    err = WatchdogExpired("no result within 5.0s", chunk=ChunkId(7, 3, 1))
    assert str(err) == "no result within 5.0s (call_id=7, chunk_index=3, cache_epoch=1)"
    assert (err.call_id, err.chunk_index, err.cache_epoch) == (7, 3, 1)
    assert str(WatchdogExpired("plain")) == "plain" and WatchdogExpired("plain").chunk is None



def test_config_is_a_package_of_small_private_modules_with_every_old_import_intact():
    import ppstage.config as config
    from pathlib import Path

    assert hasattr(config, "__path__"), "ppstage.config is a package (ppstage/config/)"
    files = sorted(Path(config.__path__[0]).glob("*.py"))
    assert all(f.name == "__init__.py" or f.name.startswith("_") for f in files), files
    for f in files:
        assert len(f.read_text().splitlines()) <= 600, f"{f.name} is over 600 lines: split it"
    # Importable from ppstage.config before the split, outside __all__: still there.
    for name in ("DRILL_SITE", "FOREVER_S", "Drill", "DrillKind", "FaultsConfig", "check_sites",
                 "LivenessConfig", "RecordConfig", "ServiceConfig"):
        assert hasattr(config, name), name
