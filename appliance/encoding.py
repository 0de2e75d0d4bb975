"""The few DICOM encodings the intake reads and writes itself, byte by byte, for speed.

Per instance the intake must read a DIMSE command set, write a File Meta Information group, find
a handful of identifying attributes in the data set and write a C-STORE-RSP. Building pydicom
Datasets for each costs more than receiving a CT slice; these functions do exactly what is needed:

* DIMSE command sets (PS3.7 6.3, E.1): group 0000, Implicit VR Little Endian, no sequences;
* the File Meta Information (PS3.10 7.1): group 0002, Explicit VR Little Endian;
* the identifying attributes of a data set (PS3.5 7.1): top-level elements up to (0020,000E)
  Series Instance UID, skipping values and sequences (defined or undefined length, nested) without
  decoding them. Anything this reader is not sure of (deflated data sets, a header that runs past
  the bytes given, a malformed element) returns None, and the caller asks pydicom.
"""

from __future__ import annotations

import struct

#: Command Field values (PS3.7 E.1-1) and the "no data set" Command Data Set Type.
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101

#: Command set attributes by keyword: (element number in group 0000, VR).
COMMAND_ELEMENTS = {
    "CommandGroupLength": (0x0000, "UL"),
    "AffectedSOPClassUID": (0x0002, "UI"),
    "RequestedSOPClassUID": (0x0003, "UI"),
    "CommandField": (0x0100, "US"),
    "MessageID": (0x0110, "US"),
    "MessageIDBeingRespondedTo": (0x0120, "US"),
    "MoveDestination": (0x0600, "AE"),
    "Priority": (0x0700, "US"),
    "CommandDataSetType": (0x0800, "US"),
    "Status": (0x0900, "US"),
    "AffectedSOPInstanceUID": (0x1000, "UI"),
    "RequestedSOPInstanceUID": (0x1001, "UI"),
    "EventTypeID": (0x1002, "US"),
    "ActionTypeID": (0x1008, "US"),
    "MoveOriginatorApplicationEntityTitle": (0x1030, "AE"),
    "MoveOriginatorMessageID": (0x1031, "US"),
}
_COMMAND_BY_ELEMENT = {element: (keyword, vr) for keyword, (element, vr) in COMMAND_ELEMENTS.items()}


class Command:
    """A decoded command set: ``get(keyword)`` as pydicom's Dataset answers it, for the attributes above."""

    def __init__(self, values: dict[str, int | str]):
        self._values = values

    def get(self, keyword: str, default=None):
        return self._values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._values


def parse_command(raw: bytes) -> Command:
    """Decode a command set (Implicit VR Little Endian); ValueError if it is not one."""
    values: dict[str, int | str] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 8 > end:
            raise ValueError("command set ends inside an element header")
        group, element, length = struct.unpack_from("<HHL", raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise ValueError(f"element ({group:04X},{element:04X}) does not belong in a command set")
        known = _COMMAND_BY_ELEMENT.get(element)
        if known is not None:
            keyword, vr = known
            value = raw[offset:offset + length]
            if vr == "US" and length == 2:
                values[keyword] = struct.unpack("<H", value)[0]
            elif vr == "UL" and length == 4:
                values[keyword] = struct.unpack("<L", value)[0]
            elif vr in ("UI", "AE"):
                values[keyword] = value.decode("ascii", "replace").strip("\0 ")
        offset += length
    if "CommandField" not in values:
        raise ValueError("command set without a Command Field")
    return Command(values)


def encode_command(**attributes: int | str) -> bytes:
    """Encode a command set from keyword arguments (PS3.7 E.1), with its Command Group Length."""
    body = bytearray()
    for keyword, value in sorted(attributes.items(), key=lambda kv: COMMAND_ELEMENTS[kv[0]][0]):
        element, vr = COMMAND_ELEMENTS[keyword]
        if vr == "US":
            data = struct.pack("<H", value)
        elif vr == "UI":
            data = value.encode("ascii")
            data += b"\0" * (len(data) % 2)
        else:
            raise ValueError(f"{keyword}: cannot encode VR {vr}")
        body += struct.pack("<HHL", 0x0000, element, len(data)) + data
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + bytes(body)


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2s2xL", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii")
    return data + pad * (len(data) % 2)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str,
              implementation_class_uid: str, implementation_version_name: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a Part 10 file (PS3.10 7.1)."""
    elements = [
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _element(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _element(0x0002, 0x0012, b"UI", _padded(implementation_class_uid, b"\0")),
        _element(0x0002, 0x0013, b"SH", _padded(implementation_version_name, b" ")),
    ]
    if source_ae.strip():
        elements.append(_element(0x0002, 0x0016, b"AE", _padded(source_ae.strip(), b" ")))
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


# -- identifying attributes of a data set (PS3.5 7.1) --------------------------------------------

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")

#: Attributes read, by tag; the reader stops after the last of them.
IDENTIFIERS = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080020: "StudyDate",
    0x00080030: "StudyTime", 0x00080050: "AccessionNumber", 0x00080060: "Modality",
    0x00100020: "PatientID", 0x00180015: "BodyPartExamined", 0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LAST = max(IDENTIFIERS)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Incomplete(Exception):
    """The bytes given end before the reader is done, or do not follow PS3.5 7.1."""


class _Reader:
    def __init__(self, data: bytes, implicit: bool, little: bool):
        self.data, self.implicit = data, implicit
        self.e = "<" if little else ">"

    def header(self, offset: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, offset of the value) of the element at ``offset``."""
        data, e = self.data, self.e
        if offset + 8 > len(data):
            raise _Incomplete
        group, element = struct.unpack_from(e + "HH", data, offset)
        tag = group << 16 | element
        if group == 0xFFFE or implicit:  # item and delimiter tags have no VR in any syntax
            return tag, None, struct.unpack_from(e + "L", data, offset + 4)[0], offset + 8
        vr = bytes(data[offset + 4:offset + 6])
        if vr in _LONG_VRS:
            if offset + 12 > len(data):
                raise _Incomplete
            return tag, vr, struct.unpack_from(e + "L", data, offset + 8)[0], offset + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Incomplete
        return tag, vr, struct.unpack_from(e + "H", data, offset + 6)[0], offset + 8

    def skip_sequence(self, offset: int, implicit: bool) -> int:
        """Offset after an undefined-length sequence (or UN) whose items start at ``offset``."""
        while True:
            tag, _, length, offset = self.header(offset, True)
            if tag == _SEQUENCE_END:
                return offset
            if tag != _ITEM:
                raise _Incomplete
            offset = offset + length if length != _UNDEFINED else self.skip_item(offset, implicit)

    def skip_item(self, offset: int, implicit: bool) -> int:
        while True:
            tag, vr, length, offset = self.header(offset, implicit)
            if tag == _ITEM_END:
                return offset
            if length == _UNDEFINED:
                # PS3.5 6.2.2: an undefined-length UN holds Implicit VR Little Endian.
                offset = self.skip_sequence(offset, implicit or vr == b"UN")
            else:
                offset += length
            if offset > len(self.data):
                raise _Incomplete


def read_identifiers(data: bytes | bytearray, transfer_syntax: str, complete: bool) -> dict[str, str] | None:
    """The :data:`IDENTIFIERS` present in a data set's first bytes, or None if unsure (ask pydicom).

    ``complete`` says ``data`` is the whole data set, not only its start.
    """
    if transfer_syntax in DEFLATED:
        return None
    reader = _Reader(data, transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN, transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
    found: dict[str, str] = {}
    offset, previous = 0, -1
    try:
        while offset < len(data):
            tag, vr, length, value_offset = reader.header(offset, reader.implicit)
            if tag <= previous or tag >> 16 == 0xFFFE:
                return None  # out of order or stray delimiter: not for this reader
            if tag > _LAST:
                return found
            previous = tag
            if length == _UNDEFINED:
                offset = reader.skip_sequence(value_offset, reader.implicit or vr == b"UN")
                continue
            offset = value_offset + length
            if offset > len(data):
                raise _Incomplete
            keyword = IDENTIFIERS.get(tag)
            if keyword is not None:
                found[keyword] = data[value_offset:offset].decode("latin-1").strip("\0 ")
        # The bytes end before (0020,000E): all there is if they are the whole data set.
        return found if complete else None
    except (_Incomplete, struct.error):
        return None
