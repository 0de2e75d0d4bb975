"""Prometheus metrics of the node: the catalogue ops alert and draw dashboards on.

Names follow Prometheus conventions (base units, ``_total`` counters, ``_seconds``/``_bytes``).
Labels are bounded: a status, a trigger, a priority, a stage, a model package name, a finding name
from a manifest, a destination name from the configuration, a short reason code; never a UID, an
AE title from the wire or anything about a patient.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

#: Buckets for sub-second work (preprocessing, inference, report, one delivery).
FAST = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
#: Buckets for waits and end-to-end times (seconds to minutes).
SLOW = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

BUILD_INFO = Info("appliance_build", "Version of the node, its inference runtime and device (cpu or gpu).")

ASSOCIATIONS_ACCEPTED = Counter(
    "appliance_associations_accepted_total", "DICOM associations accepted.")
ASSOCIATIONS_REJECTED = Counter(
    "appliance_associations_rejected_total", "DICOM associations rejected, by reason.", ["reason"])
INSTANCES_RECEIVED = Counter(
    "appliance_instances_received_total",
    "DICOM instances received by C-STORE, by outcome (stored, duplicate, refused).", ["status"])
LAST_INSTANCE = Gauge(
    "appliance_last_instance_received_timestamp_seconds",
    "Unix time of the last instance stored (0 until one arrives).")
SERIES_COMPLETED = Counter(
    "appliance_series_completed_total",
    "Series declared complete, by what completed them (release of the association, quiet timer).", ["trigger"])
SERIES_ROUTED = Counter(
    "appliance_series_routed_total", "Complete series sent to at least one model package.")
SERIES_UNROUTED = Counter(
    "appliance_series_unrouted_total", "Complete series that no route matched; kept in the spool, not processed.")
QUEUE_DEPTH = Gauge(
    "appliance_queue_depth", "Inference jobs waiting or running, by priority (stat, urgent, routine).", ["priority"])
QUEUE_WAIT = Histogram(
    "appliance_queue_wait_seconds", "Seconds a job waited in the queue before a worker took it, by priority.",
    ["priority"], buckets=SLOW)
STAGE_SECONDS = Histogram(
    "appliance_stage_seconds",
    "Seconds spent per job in each pipeline stage (decode, preprocess, inference, report), by model.",
    ["stage", "model"], buckets=FAST)
DELIVERY_SECONDS = Histogram(
    "appliance_delivery_seconds", "Seconds one result took to be sent to a destination and acknowledged.",
    ["destination"], buckets=FAST)
INFERENCES = Counter(
    "appliance_inferences_total", "Inference jobs by model package and outcome (success, rejected, error).",
    ["model", "outcome"])
INPUTS_REJECTED = Counter(
    "appliance_inputs_rejected_total",
    "Series a model could not take, by model and reason (modality, photometric, no_pixel_data, decode, ...).",
    ["model", "reason"])
FINDINGS = Counter(
    "appliance_findings_total", "Findings reported, by model, finding and level (positive, critical).",
    ["model", "finding", "level"])
DELIVERIES = Counter(
    "appliance_deliveries_total",
    "C-STORE attempts of results to destinations, by destination and result (success, refused, failure).",
    ["destination", "result"])
END_TO_END = Histogram(
    "appliance_end_to_end_seconds",
    "Seconds from a series being complete to its result being acknowledged by every destination.", buckets=SLOW)
OUTBOX_DEPTH = Gauge(
    "appliance_outbox_depth", "Results waiting in the outbox for delivery (one per result and destination).")
OUTBOX_OLDEST = Gauge(
    "appliance_outbox_oldest_age_seconds", "Age of the oldest result still waiting for delivery (0 if none).")
SPOOL_BYTES = Gauge("appliance_spool_bytes", "Bytes of received instances kept in the spool.")
DISK_FREE = Gauge("appliance_disk_free_bytes", "Free bytes on the file system that holds data_dir.")
READY = Gauge(
    "appliance_ready", "1 when every readiness check passes (as /readyz), 0 otherwise; by check.", ["check"])
MODEL_LOADED = Gauge(
    "appliance_model_loaded", "1 when a model package is loaded and warmed up, 0 when it failed.", ["model"])
STORAGE_COMMITMENTS = Counter(
    "appliance_storage_commitments_total",
    "Storage Commitment requests answered, by result: committed (every instance), failures (some not "
    "committed), undelivered (the N-EVENT-REPORT could not be delivered).", ["result"])
