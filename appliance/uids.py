"""Deterministic UIDs for what the node produces.

A result's UIDs are derived from what it is a result *of* (the source series, the model's device
UID and version), so a re-run or a re-send after a crash produces the same Series and SOP Instance
UIDs, and a PACS keeps one report instead of two that disagree.  The derivation is a SHA-256 of
the parts turned into a ``2.25.<integer>`` UID (PS3.5 B.2: UUID-derived UIDs); 128 bits keep it
within the 64 characters a UI value may have.
"""

from __future__ import annotations

import hashlib


def derived_uid(*parts: str) -> str:
    h = hashlib.sha256("\x1f".join(("appliance",) + parts).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def result_series_uid(source_series_uid: str, device_uid: str, version: str) -> str:
    return derived_uid("series", source_series_uid, device_uid, version)


def result_instance_uid(source_series_uid: str, device_uid: str, version: str, kind: str = "sr") -> str:
    return derived_uid("instance", kind, source_series_uid, device_uid, version)
