"""The node's configuration: one TOML file, every key with a documented default.

``appliance serve`` with no file gives a working node (the defaults below, the bundled demo model,
the default route).  ``appliance.example.toml`` documents every key.  A wrong key or value stops
start-up with a :class:`ConfigError` that names the key, the value and what was expected.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import BUNDLED_DIR
from .tomltable import Table

PRIORITIES = {"stat": 0, "urgent": 1, "routine": 2}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ROUTE_ATTRIBUTES = ("Modality", "BodyPartExamined", "SOPClassUID")

#: Storage SOP classes of projection radiographs: CR, DX (for presentation / for processing).
RADIOGRAPH_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",       # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",     # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",   # Digital X-Ray Image Storage - For Processing
)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    name: str
    #: DICOM keyword -> accepted values; every listed attribute must match (case-insensitive).
    match: dict[str, tuple[str, ...]]
    models: tuple[str, ...]
    priority: int

    def matches(self, attributes: dict[str, str]) -> bool:
        for keyword, accepted in self.match.items():
            value = (attributes.get(keyword) or "").strip().upper()
            if value not in accepted:
                return False
        return True


@dataclass(frozen=True)
class Config:
    ae_title: str = "APPLIANCE"
    bind: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("data")
    network_timeout: float = 60.0
    max_pdu: int = 0
    min_free_mb: int = 1024
    quiet_seconds: float = 5.0
    metrics_enabled: bool = True
    metrics_bind: str = "127.0.0.1"
    metrics_port: int = 9109
    model_dirs: tuple[Path, ...] = ()
    inference_threads: int = 0
    job_attempts: int = 3
    retry_initial_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    refused_attempts: int = 5
    delivery_timeout: float = 30.0
    log_level: str = "INFO"
    log_format: str = "json"
    include_phi: bool = False
    destinations: tuple[Destination, ...] = ()
    routes: tuple[Route, ...] = field(default_factory=lambda: (DEFAULT_ROUTE,))

    @property
    def model_search_path(self) -> list[Path]:
        return [*self.model_dirs, BUNDLED_DIR]


#: With no ``[[routes]]``: CR and DX chest radiographs go to the demo package.
DEFAULT_ROUTE = Route(
    name="chest-radiographs",
    match={"Modality": ("CR", "DX"), "BodyPartExamined": ("CHEST",), "SOPClassUID": RADIOGRAPH_SOP_CLASSES},
    models=("cxr-triage",),
    priority=PRIORITIES["urgent"],
)


def load(path: str | Path | None) -> Config:
    """Read ``path`` (or nothing: all defaults) into a validated :class:`Config`."""
    if path is None:
        return parse({})
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(doc, base=path.parent)


def parse(doc: dict[str, Any], base: Path | None = None) -> Config:
    d = Config()
    t = Table(doc, "", ConfigError, unknown_hint="; appliance.example.toml lists every key")
    node = t.table("node", {})
    completion = t.table("completion", {})
    metrics = t.table("metrics", {})
    models = t.table("models", {})
    inference = t.table("inference", {})
    delivery = t.table("delivery", {})
    logging_ = t.table("logging", {})
    data_dir = Path(node.string("data_dir", str(d.data_dir)))
    if base is not None and not data_dir.is_absolute():
        data_dir = base / data_dir
    cfg = Config(
        ae_title=node.ae_title("ae_title", d.ae_title),
        bind=node.address("bind", d.bind),
        port=node.port("port", d.port),
        data_dir=data_dir,
        network_timeout=node.number("network_timeout", d.network_timeout, minimum=1),
        max_pdu=node.integer("max_pdu", d.max_pdu, minimum=0),
        min_free_mb=node.integer("min_free_mb", d.min_free_mb, minimum=0),
        quiet_seconds=completion.number("quiet_seconds", d.quiet_seconds, minimum=0.1),
        metrics_enabled=metrics.boolean("enabled", d.metrics_enabled),
        metrics_bind=metrics.address("bind", d.metrics_bind),
        metrics_port=metrics.port("port", d.metrics_port),
        model_dirs=tuple(_resolve(Path(p), base) for p in models.strings("dirs", [])),
        inference_threads=inference.integer("threads", d.inference_threads, minimum=0),
        job_attempts=inference.integer("attempts", d.job_attempts, minimum=1),
        retry_initial_seconds=delivery.number("retry_initial_seconds", d.retry_initial_seconds, minimum=0.01),
        retry_max_seconds=delivery.number("retry_max_seconds", d.retry_max_seconds, minimum=0.01),
        refused_attempts=delivery.integer("refused_attempts", d.refused_attempts, minimum=1),
        delivery_timeout=delivery.number("timeout_seconds", d.delivery_timeout, minimum=1),
        log_level=logging_.choice("level", LOG_LEVELS, d.log_level),
        log_format=logging_.choice("format", ("json", "text"), d.log_format),
        include_phi=logging_.boolean("include_phi", d.include_phi),
        destinations=tuple(_destination(x) for x in t.tables("destinations")),
        routes=tuple(_route(x) for x in t.tables("routes")) or (DEFAULT_ROUTE,),
    )
    for table in (node, completion, metrics, models, inference, delivery, logging_, t):
        table.done()
    names = [x.name for x in cfg.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"destinations: names must be unique, got {names}")
    return cfg


def _resolve(p: Path, base: Path | None) -> Path:
    return p if p.is_absolute() or base is None else base / p


def _destination(t: Table) -> Destination:
    dest = Destination(name=t.string("name"), ae_title=t.ae_title("ae_title"),
                       host=t.string("host"), port=t.port("port"))
    t.done()
    return dest


def _route(t: Table) -> Route:
    match_table = t.table("match", {})
    match: dict[str, tuple[str, ...]] = {}
    for keyword in match_table.doc:
        if keyword not in ROUTE_ATTRIBUTES:
            raise ConfigError(f"{match_table.prefix}{keyword}: routes match on {', '.join(ROUTE_ATTRIBUTES)}")
        match[keyword] = tuple(v.strip().upper() for v in match_table.strings(keyword))
    match_table.done()
    models = t.strings("models")
    if not models:
        raise ConfigError(f"{t.prefix}models = []: expected at least one model package name")
    priority = t.choice("priority", PRIORITIES, "routine")
    route = Route(name=t.string("name"), match=match, models=tuple(models), priority=PRIORITIES[priority])
    t.done()
    return route
