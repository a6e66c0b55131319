"""Architecture discovery through the entry-point group `fusionlab.architectures`.

fusionlab registers its own backbones in the same group (see pyproject.toml), so one lookup serves
built-ins and third-party plugins alike. A plugin that fails to load is reported once, with its
distribution and the import error, and skipped: it never breaks the command line. Set
FUSIONLAB_PLUGIN_DEBUG=1 to make such failures raise instead.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from importlib import metadata

log = logging.getLogger(__name__)

GROUP = "fusionlab.architectures"
DEBUG_ENV = "FUSIONLAB_PLUGIN_DEBUG"


@dataclass(frozen=True)
class Architecture:
    """One entry point of the group, loaded or not."""

    name: str
    target: str  # "module:attribute"
    distribution: str
    version: str
    cls: type | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.cls is not None else f"failed: {self.error}"


class PluginError(RuntimeError):
    pass


@functools.cache
def discover() -> dict[str, Architecture]:
    """Load every architecture entry point once; failures are recorded, warned about and skipped."""
    found: dict[str, Architecture] = {}
    for entry in _entry_points():
        dist = entry.dist.metadata["Name"] if entry.dist else "unknown"
        version = entry.dist.version if entry.dist else "unknown"
        previous = found.get(entry.name)
        if previous is not None:
            if previous.target != entry.value:
                _report(
                    f"architecture name {entry.name!r} is registered twice with different targets: "
                    f"{previous.target} ({previous.distribution}) and {entry.value} ({dist}); "
                    f"keeping the first. Uninstall one of the two distributions."
                )
            # The same distribution seen twice on sys.path (a duplicate dist-info) is one plugin.
            continue
        found[entry.name] = _load(entry, dist, version)
    return found


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=GROUP))


def _load(entry: metadata.EntryPoint, dist: str, version: str) -> Architecture:
    try:
        cls = entry.load()
    except Exception as error:  # noqa: BLE001 - any import-time failure of third-party code
        message = f"{type(error).__name__}: {error}"
        _report(
            f"architecture plugin {entry.name!r} ({entry.value}) from distribution {dist} {version} "
            f"failed to load and is skipped: {message}. Reinstall or fix that distribution, or "
            f"uninstall it; set {DEBUG_ENV}=1 to raise this error.",
            error,
        )
        return Architecture(entry.name, entry.value, dist, version, error=message)
    log.debug("architecture %r loaded from %s (%s %s)", entry.name, entry.value, dist, version)
    return Architecture(entry.name, entry.value, dist, version, cls=cls)


def _report(message: str, error: BaseException | None = None) -> None:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise PluginError(message) from error
    log.warning(message)


def get_architecture(name: str) -> type:
    """Return the backbone class registered as `name`, or raise naming the failure or the choices."""
    architectures = discover()
    if name not in architectures:
        raise KeyError(f"unknown architecture {name!r}; installed: {', '.join(sorted(architectures))}")
    arch = architectures[name]
    if arch.cls is None:
        raise PluginError(f"architecture {name!r} from {arch.distribution} failed to load: {arch.error}")
    return arch.cls
