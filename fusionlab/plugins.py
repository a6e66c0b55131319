"""Architecture discovery through the entry-point group `fusionlab.architectures`.

Each entry point maps a name to a backbone class (`cross_attention = fusionlab_xattn:CrossAttentionFusion`).
fusionlab registers its own backbones in the same group (see pyproject.toml), so one lookup serves
built-ins and third-party plugins alike. Sizes are not registered here: they live in YAML recipes.

A plugin that fails to load is reported once per process, with its distribution, the import error
and the remedy, and skipped: it never breaks the command line. Set FUSIONLAB_PLUGIN_DEBUG=1 (or run
`fusionlab plugins --debug`) to make such failures raise instead.

Loading a plugin imports its module, and with it the subclass of `Backbone` it defines. That is what
lets a recipe name a plugin backbone by its class name alone (`class_path: CrossAttentionFusion`):
jsonargparse resolves short names among the imported subclasses of the declared base class.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata

log = logging.getLogger(__name__)

GROUP = "fusionlab.architectures"
DEBUG_ENV = "FUSIONLAB_PLUGIN_DEBUG"
BUILTIN_DISTRIBUTION = "fusionlab"


@dataclass(frozen=True)
class Architecture:
    """One entry point of the group: where it points, who installed it, and the class or the error."""

    name: str
    target: str  # "module:attribute", as written in the distribution's entry_points.txt
    distribution: str
    version: str
    cls: type | None = None
    error: str | None = None

    @property
    def class_path(self) -> str:
        """The import path to write as `class_path` in a recipe."""
        if self.cls is not None:
            return f"{self.cls.__module__}.{self.cls.__qualname__}"
        return self.target.replace(":", ".")

    @property
    def status(self) -> str:
        return "ok" if self.cls is not None else f"failed: {self.error}"


@dataclass(frozen=True)
class Registry:
    """The result of one scan: architectures by name, and entry points ignored as name conflicts."""

    architectures: dict[str, Architecture]
    conflicts: list[Architecture] = field(default_factory=list)


class PluginError(RuntimeError):
    """An architecture plugin failed to load, or a name does not resolve to a usable backbone."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@functools.cache
def scan() -> Registry:
    """Load every entry point of the group once; failures are recorded, reported and skipped.

    Built-ins are loaded first, so a plugin cannot take over a built-in name. A name registered
    again with the same target (the same distribution found twice on sys.path) counts once. A name
    registered again with a different target is a conflict: the first one is kept, and the other is
    reported and listed in `conflicts`.
    """
    architectures: dict[str, Architecture] = {}
    conflicts: list[Architecture] = []
    entries = sorted(_entry_points(), key=lambda entry: _distribution(entry)[0] != BUILTIN_DISTRIBUTION)
    for entry in entries:
        dist, version = _distribution(entry)
        previous = architectures.get(entry.name)
        if previous is None:
            architectures[entry.name] = _load(entry, dist, version)
        elif previous.target != entry.value:
            conflicts.append(Architecture(entry.name, entry.value, dist, version, error="name conflict"))
            _report(
                f"architecture name {entry.name!r} is registered twice with different targets: "
                f"{previous.target} ({previous.distribution} {previous.version}) and {entry.value} "
                f"({dist} {version}); keeping the first. Uninstall one of the two distributions, or "
                f"rename the entry point in the plugin's pyproject.toml."
            )
    return Registry(architectures, conflicts)


def discover() -> dict[str, Architecture]:
    """Return every registered architecture by entry-point name, loaded or failed."""
    return scan().architectures


def refresh() -> None:
    """Forget the cached scan, so the next call looks at the installed distributions again."""
    scan.cache_clear()


def get_architecture(name: str) -> type:
    """Return the backbone class registered as `name`, or raise naming the failure or the choices."""
    architectures = discover()
    if name not in architectures:
        raise KeyError(
            f"unknown architecture {name!r}; installed: {', '.join(sorted(architectures)) or 'none'}. "
            "Run `fusionlab plugins` to list them with their distributions."
        )
    arch = architectures[name]
    if arch.cls is None:
        raise PluginError(
            f"architecture {name!r} ({arch.target}) from {arch.distribution} {arch.version} failed to "
            f"load: {arch.error}"
        )
    return arch.cls


def _entry_points() -> list[metadata.EntryPoint]:
    # importlib.metadata already yields one distribution per normalised name, the first on sys.path.
    return list(metadata.entry_points(group=GROUP))


def _distribution(entry: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


def _load(entry: metadata.EntryPoint, dist: str, version: str) -> Architecture:
    try:
        cls = entry.load()
        _check_backbone_class(cls, entry)
    except Exception as error:  # noqa: BLE001 - any failure of third-party code at import time
        message = f"{type(error).__name__}: {error}"
        _report(
            f"architecture plugin {entry.name!r} ({entry.value}) from distribution {dist} {version} "
            f"failed to load and is skipped: {message}. Fix or reinstall that distribution, or "
            f"uninstall it; set {DEBUG_ENV}=1 to raise this error with its traceback.",
            error,
        )
        return Architecture(entry.name, entry.value, dist, version, error=message)
    log.info("added architecture %r from %s %s: %s", entry.name, dist, version, entry.value)
    return Architecture(entry.name, entry.value, dist, version, cls=cls)


def _check_backbone_class(cls: object, entry: metadata.EntryPoint) -> None:
    # Imported here: the base class pulls in torch, which `fusionlab --help` does not need.
    from fusionlab.models.base import Backbone

    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(
            f"entry point {entry.value} is {cls!r}, not a subclass of fusionlab.models.Backbone; "
            "point it at the backbone class itself"
        )


def _report(message: str, error: BaseException | None = None) -> None:
    if debug_enabled():
        raise PluginError(message) from error
    log.warning(message)
