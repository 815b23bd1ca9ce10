"""What the app knows of an experiment script without importing it (or torch): a worker process
loaded it and described it (:func:`lrviz.live.worker.describe_experiment`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ScriptInfo:
    """An experiment script as the worker saw it: its DEFAULTS, PARAMS, docstring, what it accepts,
    and its 2-D surfaces sampled on a grid (``surfaces``: ``{"default": name, "by_name": {...}}``)."""

    path: Path
    name: str
    source_hash: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    doc: str = ""
    accepts_batch_size: bool = False
    has_custom_optimizer: bool = False
    has_probe: bool = False
    #: The default of ``build_data(batch_size=...)`` (None: it takes none, or has no whole-number default).
    batch_size_default: int | None = None
    param_choices: dict[str, list[Any]] = field(default_factory=dict)
    surfaces: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScriptInfo:
        return cls(path=Path(d["path"]), name=str(d.get("name") or Path(d["path"]).stem),
                   source_hash=str(d.get("source_hash") or ""), defaults=dict(d.get("defaults") or {}),
                   params=dict(d.get("params") or {}), doc=str(d.get("doc") or ""),
                   accepts_batch_size=bool(d.get("accepts_batch_size")),
                   has_custom_optimizer=bool(d.get("has_custom_optimizer")), has_probe=bool(d.get("has_probe")),
                   batch_size_default=_int_or_none(d.get("batch_size_default")),
                   param_choices=dict(d.get("param_choices") or {}), surfaces=dict(d.get("surfaces") or {}))

    def surface(self, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The surface to draw for these knob values (the ``surface`` knob picks one), or None."""
        by_name = (self.surfaces or {}).get("by_name") or {}
        if not by_name:
            return None
        merged = {**self.params, **(params or {})}
        name = merged.get("surface")
        if name in by_name:
            return by_name[name]
        return by_name.get(self.surfaces.get("default")) or next(iter(by_name.values()))


def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None
