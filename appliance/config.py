"""The node's configuration: one TOML file, every key with a documented default.

``appliance serve`` with no file gives a working node (the defaults below, the bundled demo model,
the default route).  ``appliance.example.toml`` documents every key.  A wrong key or value stops
start-up with a :class:`ConfigError` that names the key, the value and what was expected.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import BUNDLED_DIR
from .tomltable import Table

PRIORITIES = {"stat": 0, "urgent": 1, "routine": 2}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: What runs the models: ONNX Runtime on the CPU, TensorRT engines on the GPU, or TensorRT where it can.
INFERENCE_RUNTIMES = ("onnxruntime", "tensorrt", "auto")
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
class Access:
    """Who may open an association (PS3.8 7.1.1: AE titles; the transport: source addresses, limits).

    Empty ``calling_ae_titles`` or ``networks`` mean "any". Limits count open connections, TLS or not.
    """

    calling_ae_titles: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    require_called_aet: bool = False
    max_associations: int = 32
    max_associations_per_source: int = 16


@dataclass(frozen=True)
class Tls:
    """DICOM TLS (PS3.15 B.9, BCP 195): a second listener, TLS 1.2 and 1.3 only."""

    enabled: bool = False
    port: int = 2762
    certificate: Path | None = None
    private_key: Path | None = None
    #: Trusted CA certificates (PEM) for client certificates; without it none is asked for.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class CommitmentRequestor:
    """Where a Storage Commitment SCU listens for an N-EVENT-REPORT on a new association."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Commitment:
    """Storage Commitment Push Model SCP (PS3.4 Annex J)."""

    enabled: bool = True
    requestors: tuple[CommitmentRequestor, ...] = ()


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
    max_pdu: int = 1048576
    min_free_mb: int = 1024
    quiet_seconds: float = 5.0
    metrics_enabled: bool = True
    metrics_bind: str = "127.0.0.1"
    metrics_port: int = 9109
    model_dirs: tuple[Path, ...] = ()
    inference_threads: int = 0
    inference_runtime: str = "onnxruntime"
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
    access: Access = Access()
    tls: Tls = Tls()
    commitment: Commitment = Commitment()

    @property
    def model_search_path(self) -> list[Path]:
        return [*self.model_dirs, BUNDLED_DIR]

    @property
    def engines_dir(self) -> Path:
        """Where `appliance build-engine` writes TensorRT engines and the node reads them."""
        return self.data_dir / "engines"


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
    access = t.table("access", {})
    tls = t.table("tls", {})
    commitment = t.table("commitment", {})
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
        inference_runtime=inference.choice("runtime", INFERENCE_RUNTIMES, d.inference_runtime),
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
        access=_access(access, d.access),
        tls=_tls(tls, d.tls, base),
        commitment=_commitment(commitment, d.commitment),
    )
    for table in (node, completion, metrics, models, inference, delivery, logging_, access, tls, commitment, t):
        table.done()
    if cfg.tls.enabled and cfg.tls.port == cfg.port:
        raise ConfigError(f"tls.port = {cfg.tls.port}: the TLS port must differ from node.port; "
                          "DICOM TLS conventionally listens on 2762")
    names = [x.name for x in cfg.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"destinations: names must be unique, got {names}")
    return cfg


def _resolve(p: Path, base: Path | None) -> Path:
    return p if p.is_absolute() or base is None else base / p


def _access(t: Table, d: Access) -> Access:
    networks = []
    for value in t.strings("networks", list(d.networks)):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError(f"access.networks: {value!r} is not an IP address or network; "
                              "expected e.g. \"10.1.2.3\" or \"10.1.0.0/16\"") from None
    calling = t.strings("calling_ae_titles", list(d.calling_ae_titles))
    for i, title in enumerate(calling):
        Table({"ae": title}, f"access.calling_ae_titles[{i}].", ConfigError).ae_title("ae")
    return Access(
        calling_ae_titles=tuple(title.strip() for title in calling),
        networks=tuple(networks),
        require_called_aet=t.boolean("require_called_aet", d.require_called_aet),
        max_associations=t.integer("max_associations", d.max_associations, minimum=1),
        max_associations_per_source=t.integer("max_associations_per_source", d.max_associations_per_source,
                                              minimum=1),
    )


def _file(t: Table, key: str, base: Path | None) -> Path | None:
    if not t.has(key):
        t.seen.add(key)
        return None
    path = _resolve(Path(t.string(key)), base)
    if not path.is_file():
        raise ConfigError(f"{t.prefix}{key} = {str(path)!r}: no such file; give the path of a PEM file")
    return path


def _tls(t: Table, d: Tls, base: Path | None) -> Tls:
    tls = Tls(
        enabled=t.boolean("enabled", d.enabled),
        port=t.port("port", d.port),
        certificate=_file(t, "certificate", base),
        private_key=_file(t, "private_key", base),
        ca_certificates=_file(t, "ca_certificates", base),
        require_client_certificate=t.boolean("require_client_certificate", d.require_client_certificate),
    )
    if tls.enabled and (tls.certificate is None or tls.private_key is None):
        raise ConfigError("tls.enabled = true needs tls.certificate and tls.private_key (PEM files)")
    if tls.require_client_certificate and tls.ca_certificates is None:
        raise ConfigError("tls.require_client_certificate = true needs tls.ca_certificates, "
                          "the CA certificates client certificates are verified against")
    return tls


def _commitment(t: Table, d: Commitment) -> Commitment:
    requestors = []
    for r in t.tables("requestors"):
        requestors.append(CommitmentRequestor(ae_title=r.ae_title("ae_title"), host=r.string("host"),
                                              port=r.port("port")))
        r.done()
    titles = [r.ae_title for r in requestors]
    if len(set(titles)) != len(titles):
        raise ConfigError(f"commitment.requestors: AE titles must be unique, got {titles}")
    return Commitment(enabled=t.boolean("enabled", d.enabled), requestors=tuple(requestors))


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
