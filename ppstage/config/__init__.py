"""The one typed configuration of a ppstage deployment.

Loaded from TOML (``PPStageConfig.from_toml``), overridable by CLI flags
(``with_overrides``), and reduced to a canonical digest for the start-up
parity handshake: every rank must resolve exactly the same config.

Constraints live in the types (msgspec ``Meta``: durations > 0, queue depths
>= 1, ...) and cross-field rules in ``__post_init__``; either way a bad value
is refused at load with a ``ConfigError`` naming its key path, e.g.
``runtime.pg_timeout_s: must be > 0, got -1``.

| module | what |
|---|---|
| ``_sections.py`` | one Struct per section (``[model]`` ... ``[liveness]``) and the bounded number types |
| ``_drills.py`` | the ``[[faults.drill]]`` schema and where each kind can act |
| ``_root.py`` | ``PPStageConfig``: the sections together, rules across them, derived values, TOML, digest |
| ``_docs.py`` | one line of meaning per key, with type and default from the schema (``ppstage config --keys``) |
| ``_load.py`` | ``ConfigError``; TOML and nested data to typed config, msgspec errors as key paths |

Import from ``ppstage.config`` only: the modules are private.
"""

from __future__ import annotations

from protocol import RecomputeMode

# ``__all__`` is frozen (tests/test_public_api.py); as before the split, the other sections and the
# drill schema (which ppstage.faults builds on) are importable from here too.
from ppstage.config._docs import KeyDoc, key_docs
from ppstage.config._drills import DRILL_SITE, FOREVER_S, Drill, DrillKind, FaultsConfig, check_sites
from ppstage.config._load import ConfigError
from ppstage.config._root import PPStageConfig
from ppstage.config._sections import (
    CacheConfig,
    CacheGeometry,
    DenoiseConfig,
    LivenessConfig,
    ModelConfig,
    RecomputeConfig,
    RecordConfig,
    RuntimeConfig,
    ServiceConfig,
    TopologyConfig,
    step_list_problem,
)

__all__ = [
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
]

