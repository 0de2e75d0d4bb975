"""Prometheus metrics of the node.

Names follow Prometheus conventions (base units, ``_total`` counters).  Labels are bounded: a
status, a trigger, a model package name, a destination name from the configuration, a short
reason code; never a UID, an AE title from the wire or anything about a patient.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

INSTANCES_RECEIVED = Counter(
    "appliance_instances_received_total",
    "DICOM instances received by C-STORE, by outcome (stored, duplicate, refused).",
    ["status"])
SERIES_COMPLETED = Counter(
    "appliance_series_completed_total",
    "Series declared complete, by what completed them (release of the association, quiet timer).",
    ["trigger"])
SERIES_UNROUTED = Counter(
    "appliance_series_unrouted_total",
    "Complete series that no route matched; kept in the spool, not processed.")
INFERENCES = Counter(
    "appliance_inferences_total",
    "Inference jobs by model package and outcome (success, rejected, error).",
    ["model", "outcome"])
INPUTS_REJECTED = Counter(
    "appliance_inputs_rejected_total",
    "Series a model could not take, by model and reason (modality, photometric, no_pixel_data, decode, ...).",
    ["model", "reason"])
DELIVERIES = Counter(
    "appliance_deliveries_total",
    "C-STORE attempts of results to destinations, by destination and result (success, refused, failure).",
    ["destination", "result"])
END_TO_END = Histogram(
    "appliance_end_to_end_seconds",
    "Seconds from a series being complete to its result being acknowledged by every destination.",
    buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0))
OUTBOX_DEPTH = Gauge(
    "appliance_outbox_depth",
    "Results waiting in the outbox for delivery (one per result and destination).")


def serve(bind: str, port: int) -> None:
    """Expose ``/metrics`` over HTTP on ``bind:port`` (a daemon thread)."""
    start_http_server(port, addr=bind)
