"""The model backend a config names: ``[model] backend``.

``"toy"`` (the default) is the embedded model. Any other value is either the
name of an entry point in the group ``ppstage.backends`` (an installed
package declares it in its ``pyproject.toml``) or ``"package.module:factory"``.
Either way it resolves to a zero-argument factory returning a ``ModelBackend``:
how every generator rank builds its ``GeneratorBackend`` and how rank 0
builds its ``Stage0Backend`` (docs/models.md has a worked example).

Device: ``build_generator`` and ``build_stage0`` pass ``device=`` (the rank's,
``runtime.device``) only to a factory whose signature takes it (a ``device``
parameter or ``**kwargs``); a backend written without one still loads and
chooses its own device.

The backend's name is part of the config, so the start-up parity handshake
refuses a world whose ranks would run different models.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

import torch
from torch import Tensor

from ppstage.config import ConfigError, PPStageConfig
from ppstage.model.backend import GeneratorBackend, Stage0Backend, ToyStage0

ENTRY_POINT_GROUP = "ppstage.backends"
TOY = "toy"


@dataclass(frozen=True)
class ModelBackend:
    """How to build the models of every rank.

    ``generator(config, layer_range, *, tp_rank=0, tp_size=1, reduce=None[, device])`` builds
    layers ``[a, b)`` (one tensor-parallel shard of them when ``tp_size > 1``; partial
    sums go through ``reduce``). ``stage0(config[, device])`` builds rank 0's text encoder
    and VAE. Either may take ``device`` (a ``torch.device``); see the module docstring.
    """

    generator: Callable[..., GeneratorBackend]
    stage0: Callable[[PPStageConfig], Stage0Backend]


def toy_backend() -> ModelBackend:
    """The embedded model (``GeneratorStage``, ``ToyTextEncoder`` + ``ToyVAE``)."""
    from ppstage.model.stage import GeneratorStage

    def stage0(config: PPStageConfig, device: torch.device | str = "cpu") -> Stage0Backend:
        return ToyStage0(config.model, device)

    return ModelBackend(generator=GeneratorStage, stage0=stage0)


def load_backend(config: PPStageConfig) -> ModelBackend:
    """Resolve ``config.model.backend``; ``ConfigError`` naming ``model.backend`` if it cannot."""
    name = config.model.backend
    factory = toy_backend if name == TOY else _find(name)
    try:
        backend = factory()
    except Exception as exc:  # the plugin's own failure, reported as a config problem
        raise ConfigError(f"model.backend = {name!r}: its factory failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(backend, ModelBackend):
        raise ConfigError(f"model.backend = {name!r}: the factory returned {type(backend).__name__}, "
                          "not a ppstage.model.loader.ModelBackend")
    return backend


def build_generator(
    config: PPStageConfig,
    layer_range: tuple[int, int],
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    reduce: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
) -> GeneratorBackend:
    """Layers ``[a, b)`` of the configured backend's generator, on ``device`` if it takes one."""
    make = load_backend(config).generator
    extra = _device_kwarg(make, device)
    return make(config, layer_range, tp_rank=tp_rank, tp_size=tp_size, reduce=reduce, **extra)


def build_stage0(config: PPStageConfig, device: torch.device | str | None = None) -> Stage0Backend:
    """Rank 0's models from the configured backend, on ``device`` if it takes one."""
    make = load_backend(config).stage0
    return make(config, **_device_kwarg(make, device))


def takes_device(factory: Callable[..., object]) -> bool:
    """Whether ``factory`` accepts a ``device`` keyword (a named parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == "device" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


def _device_kwarg(factory: Callable[..., object], device: torch.device | str | None) -> dict[str, object]:
    return {"device": device} if device is not None and takes_device(factory) else {}


def _find(name: str) -> Callable[[], object]:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"model.backend = {name!r}: cannot import {module_name!r}: {exc}") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ConfigError(f"model.backend = {name!r}: {module_name!r} has no callable {attr!r}")
        return factory
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        known = sorted({TOY, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise ConfigError(
            f"model.backend = {name!r}: unknown backend (known: {', '.join(known)}; "
            f"or 'package.module:factory')"
        )
    try:
        return next(iter(found)).load()
    except Exception as exc:
        raise ConfigError(f"model.backend = {name!r}: cannot load its entry point: {exc}") from exc
