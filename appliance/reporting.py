"""Reporting: a model's findings for one series -> a DICOM structured report a PACS keeps.

The report is a Comprehensive 3D SR instance (PS3.3 A.35.13) whose content tree is TID 1500
Measurement Report (PS3.16), encoded the way the IHE Radiology AI Results (AIR) profile asks an
Evidence Creator to encode an AI result:

- the observer is the model, a Device observer (TID 1002 / TID 1004): Device Observer UID is the
  package's device UID, so a reader can tell which trained instance produced the result;
- Procedure Reported names the imaging procedure the findings are about;
- an Image Library (TID 1600) lists every source instance, and the SOP Common evidence sequences
  reference them as well;
- each finding is one Measurement Group (TID 1501) with a tracking identifier, the finding type and
  site, the algorithm (TID 4019), its presence stated as a coded qualitative evaluation, the
  model's probability as a number (TID 300), and whether the finding is critical.

``read_report`` walks the content tree of such a report with pydicom only, so the CLI and the
tests can check what a PACS received without trusting the library that wrote it.
"""

from __future__ import annotations

import copy
import datetime
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
    UIDRefContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as DicomCode
from pydicom.valuerep import DA, DT, TM

from .manifest import Code, ModelPackage
from .postprocessing import Finding
from .uids import derived_uid

__all__ = ["ReportError", "ReportedFinding", "build_report", "read_report"]

# --- Coded concepts --------------------------------------------------------------------------

#: Procedure Reported (TID 1500 row 3, CID 100 is extensible).  "Plain chest X-ray" says what the
#: findings are about without claiming a number of views, which LOINC's "XR Chest 2 Views" or
#: "XR Chest Single view" would.  A package that is not chest-only falls back to CID 100's
#: "XR unspecified body region", and a non-radiographic one to CID 100's "Imaging procedure".
PLAIN_CHEST_XRAY = DicomCode("399208008", "SCT", "Plain chest X-ray")
XR_UNSPECIFIED = codes.LN.XRUnspecifiedBodyRegion          # 43468-8
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure             # 363679005
_RADIOGRAPHIC_MODALITIES = frozenset({"CR", "DX", "RG"})

#: Presence is a TID 1501 qualitative evaluation whose concept name is the finding itself and whose
#: value comes from CID 240 "Present-Absent": a viewer that lists a group's evaluations flat shows
#: "Pneumothorax: Present", which needs no context to read.  CID 240 in current PS3.16 uses
#: SCT 272519000 for Absent; SCT 2667000 (the older, now inactive concept) is still accepted when
#: reading.
PRESENT = codes.SCT.Present                                # 52101004
ABSENT = codes.SCT.Absent                                  # 272519000
_ABSENT_VALUES = frozenset({("272519000", "SCT"), ("2667000", "SCT"), ("121054", "DCM")})
_PRESENT_VALUES = frozenset({("52101004", "SCT"), ("121053", "DCM")})

#: The model's output as a number: DCM 111012 "Certainty of Finding" is the concept PS3.16 uses for
#: a CAD algorithm's confidence that a finding is real (CID 6048, the CAD SR templates); it is
#: given there in percent, so it is here too: 0-100, UCUM "%".
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding        # 111012
PERCENT = codes.UCUM.Percent

#: Whether a finding crosses the package's critical threshold.  PS3.16 has no concept for "this
#: finding needs communicating now" (LOINC 73568-8 is a report section heading, RadLex's ACR
#: actionable-finding categories are values without a concept name), so the name is a local code:
#: a "99" coding scheme designator is how PS3.16 8.2 marks a private scheme, and the scheme is
#: declared in the Coding Scheme Identification Sequence.  The value is CID 230 Yes/No.
LOCAL_SCHEME = "99APPLIANCE"
CRITICAL_FINDING = DicomCode("CRITICAL", LOCAL_SCHEME, "Critical finding")
YES = codes.SCT.Yes                                        # 373066001
NO = codes.SCT.No                                          # 373067005

_FINDING = ("121071", "DCM")
_IMAGING_MEASUREMENTS = ("126010", "DCM")
_MEASUREMENT_GROUP = ("125007", "DCM")

#: A result series stands apart from the scanner's series (usually 1-100) in a viewer's list.
REPORT_SERIES_NUMBER = 9001
REPORT_INSTANCE_NUMBER = 1

#: Type 2 attributes highdicom reads from the first source; PS3.3 lets them be present and empty,
#: and real scanner output often leaves them out altogether.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")
#: Type 1 attributes a source must have to be referenced in the report.
_TYPE1_NEEDED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                 "Modality", "Rows", "Columns")
_BULK_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float, Double Float
_DA_RE = re.compile(r"^[0-9]{8}$")
_TM_RE = re.compile(r"^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: CID 33 "Modality": the acquisition modalities of CID 29 plus the rest (OT, for one).
_MODALITY_CODES = {c.value: c for c in (getattr(codes.cid33, k) for k in codes.cid33.dir())}


class ReportError(ValueError):
    """A report that cannot be built or read; the message names the attribute and the fix."""


@dataclass(frozen=True)
class ReportedFinding:
    """One Measurement Group of a report, as a reader of the report sees it."""

    finding: Code
    present: bool
    probability: float
    critical: bool | None


# --- Building --------------------------------------------------------------------------------

def build_report(
    sources: Sequence[Dataset],
    pkg: ModelPackage,
    findings: Sequence[Finding],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    content_datetime: datetime.datetime | None = None,
) -> Dataset:
    """Build the Comprehensive 3D SR (PS3.3 A.35.13) that reports ``findings`` on ``sources``.

    The content is TID 1500 Measurement Report (PS3.16) with a Device observer (TID 1004) for the
    model, an Image Library (TID 1600) of the sources, and one TID 1501 Measurement Group per
    finding carrying TID 4019 Algorithm Identification.  Patient and study come from the sources;
    the series and instance are new, with exactly the UIDs given, so building again from the same
    inputs gives the same UIDs and, with the same ``content_datetime``, the same content.  The
    caller's datasets are not modified.
    """
    _check_uid("series_instance_uid", series_instance_uid)
    _check_uid("sop_instance_uid", sop_instance_uid)
    evidence = _evidence(sources)
    groups = _measurement_groups(evidence, pkg, findings, sop_instance_uid)

    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=pkg.device_uid,
            name=pkg.name,
            manufacturer_name=pkg.manufacturer,
            model_name=pkg.name,
            # A model has no hardware serial; the device UID is what identifies this trained
            # instance of it (the manifest renews it on every retrain).
            serial_number=pkg.device_uid,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure_reported(evidence, pkg),
        imaging_measurements=groups,
    )
    root = report[0]
    # TID 1500 puts the Image Library (row 4) before Imaging Measurements (row 6).  It is built
    # here rather than by highdicom, which gives up on a radiograph without Patient Orientation or
    # Imager Pixel Spacing; those descriptors are optional in TID 1603.
    root.ContentSequence.insert(len(root.ContentSequence) - 1, _image_library(evidence))

    when = content_datetime or datetime.datetime.now()
    first = evidence[0]
    # highdicom warns and logs a Patient's Name it finds unusual, verbatim; it gets an empty one
    # and the SR gets the source's afterwards, so no name reaches a log (STYLE: no PHI in logs).
    patient_name = copy.deepcopy(first["PatientName"])
    first.PatientName = None
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=REPORT_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=REPORT_INSTANCE_NUMBER,
        manufacturer=_lo(pkg.manufacturer),
        manufacturer_model_name=_lo(pkg.name),
        software_versions=_lo(pkg.version),
        device_serial_number=pkg.device_uid,
        institution_name=first.get("InstitutionName") or None,
        is_complete=True,
        # An AI result is not the definitive report on the study, and nobody has verified it.
        is_final=False,
        is_verified=False,
        series_description=_lo(f"AI results: {pkg.name} {pkg.version}"),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME,
            name="Appliance local concepts",
            responsible_organization=_lo(pkg.manufacturer),
        )],
    )
    sr["PatientName"] = patient_name
    # highdicom stamps the wall clock on these; the instance is re-created, not new, on a re-run.
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    for item in sr.get("ContributingEquipmentSequence", []):
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.ProcessingEquipment.value:
            item.ContributionDateTime = DT(when)
    if when.utcoffset() is not None:
        minutes = int(when.utcoffset().total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        sr.TimezoneOffsetFromUTC = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return sr


def _check_uid(name: str, uid: str) -> None:
    if not isinstance(uid, str) or len(uid) > 64 or not _UID_RE.match(uid):
        raise ReportError(f"{name} = {uid!r} is not a DICOM UID (digits and dots, at most 64 "
                          "characters); derive it with appliance.uids")


def _lo(text: str) -> str:
    """A Long String (LO) value: at most 64 characters (PS3.5 6.2)."""
    return text[:64]


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """Header-only copies of the sources, with absent Type 2 attributes present and empty."""
    if not sources:
        raise ReportError("no source instances; a report needs the instances its findings are "
                          "about")
    result = []
    for n, src in enumerate(sources, start=1):
        for keyword in _TYPE1_NEEDED:
            if src.get(keyword) in (None, ""):
                where = src.get("SOPInstanceUID") or f"source #{n}"
                raise ReportError(f"source instance {where} has no {keyword} (Type 1); the sender "
                                  f"must supply it, or routing must exclude such instances")
        header = Dataset()
        for elem in src:
            if elem.tag not in _BULK_TAGS:
                header.add(copy.deepcopy(elem))
        for keyword in _TYPE2_COPIED:
            if keyword not in header:
                setattr(header, keyword, None)
        if header.PatientSex not in (None, "", "M", "F", "O"):
            header.PatientSex = None        # PS3.3 C.7.1.1: M, F or O; anything else is unknown
        for keyword, vr in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
            setattr(header, keyword, _conformant(header[keyword].value, vr))
        result.append(header)
    studies = {ds.StudyInstanceUID for ds in result}
    if len(studies) > 1:
        raise ReportError(f"source instances belong to {len(studies)} studies; a report is about "
                          "one series of one study, so assemble the series before reporting")
    return result


def _conformant(value: object, vr: type) -> str | None:
    """``value`` as a conformant DA or TM string (PS3.5 6.2), or None where it cannot be one.

    highdicom refuses non-conformant dates and times; old ACR-NEMA style values ("14:04:38",
    "1997.04.24") are kept without their separators, anything else is left empty (Type 2).
    """
    text = "" if value is None else str(value).strip()
    pattern, separators = (_DA_RE, ".-/") if vr is DA else (_TM_RE, ":")
    for candidate in (text, text.translate({ord(c): None for c in separators})):
        if pattern.match(candidate):
            try:
                vr(candidate)
            except ValueError:
                return None
            return candidate
    return None


def _procedure_reported(evidence: Sequence[Dataset], pkg: ModelPackage) -> DicomCode:
    """TID 1500 row 3 Procedure Reported, from the sources' modality and the package's body part."""
    if not all(ds.Modality in _RADIOGRAPHIC_MODALITIES for ds in evidence):
        return IMAGING_PROCEDURE
    chest = pkg.applicability.body_parts == ("CHEST",) or all(
        str(ds.get("BodyPartExamined", "")).upper() == "CHEST" for ds in evidence)
    return PLAIN_CHEST_XRAY if chest else XR_UNSPECIFIED


def _coded(code: Code) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _measurement_groups(
    evidence: Sequence[Dataset],
    pkg: ModelPackage,
    findings: Sequence[Finding],
    sop_instance_uid: str,
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 Measurement Group per finding."""
    if not findings:
        raise ReportError(f"no findings for package {pkg.name!r}; postprocessing.findings gives "
                          "one per manifest output, and a report needs at least one")
    seen = set()
    groups = []
    for finding in findings:
        out = finding.output
        if out not in pkg.outputs:
            raise ReportError(f"finding for output {out.name!r} is not an output of package "
                              f"{pkg.name!r} {pkg.version}; report the findings of the package "
                              "that ran")
        if out.name in seen:
            raise ReportError(f"two findings for output {out.name!r}; report each output once")
        seen.add(out.name)
        p = finding.probability
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ReportError(f"probability of output {out.name!r} is {p!r}, not in [0, 1]; "
                              "check outputs.activation in the package manifest")
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derived_uid(sop_instance_uid, "tracking", out.name),
                identifier=out.name,
            ),
            finding_type=_coded(out.finding),
            finding_sites=[FindingSite(_coded(out.finding_site))] if out.finding_site else None,
            algorithm_id=AlgorithmIdentification(
                name=pkg.name, version=pkg.version, manufacturer=pkg.manufacturer),
            measurements=[Measurement(
                name=CERTAINTY_OF_FINDING, value=float(p) * 100.0, unit=PERCENT)],
            qualitative_evaluations=[
                QualitativeEvaluation(_coded(out.finding), PRESENT if finding.present else ABSENT),
                QualitativeEvaluation(CRITICAL_FINDING, YES if finding.critical else NO),
            ],
            # The findings are per series (the highest probability over its images), so every
            # source image is a source of every group.
            source_images=[SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
                           for ds in evidence],
        ))
    return groups


def _image_library(evidence: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library: one group per modality and frame of reference (TID 1601)."""
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = CodedConcept("{pixels}", "UCUM", "Pixels")
    groups: dict[tuple[str, str], list[ImageContentItem]] = {}
    for ds in evidence:
        modality = _MODALITY_CODES.get(ds.Modality)
        if modality is None:
            raise ReportError(f"source instance {ds.SOPInstanceUID} has Modality {ds.Modality!r}, "
                              "not a CID 33 modality; the sender must correct it")
        # TID 1602 / 1603 descriptors, each only where the source has it.
        descriptors = [CodeContentItem(codes.DCM.Modality, modality, acq)]
        if "FrameOfReferenceUID" in ds:
            descriptors.append(UIDRefContentItem(codes.DCM.FrameOfReferenceUID,
                                                 ds.FrameOfReferenceUID, acq))
        descriptors.append(NumContentItem(codes.DCM.PixelDataRows, int(ds.Rows), pixels,
                                          relationship_type=acq))
        descriptors.append(NumContentItem(codes.DCM.PixelDataColumns, int(ds.Columns), pixels,
                                          relationship_type=acq))
        orientation = ds.get("PatientOrientation")
        if orientation is not None and len(orientation) == 2:
            descriptors.append(TextContentItem(codes.DCM.PatientOrientationRow,
                                               orientation[0], acq))
            descriptors.append(TextContentItem(codes.DCM.PatientOrientationColumn,
                                               orientation[1], acq))
        spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
        if spacing is not None and len(spacing) == 2:
            descriptors.append(NumContentItem(codes.DCM.HorizontalPixelSpacing, float(spacing[1]),
                                              codes.UCUM.Millimeter, relationship_type=acq))
            descriptors.append(NumContentItem(codes.DCM.VerticalPixelSpacing, float(spacing[0]),
                                              codes.UCUM.Millimeter, relationship_type=acq))
        image = ImageContentItem(
            name=CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        image.ContentSequence = descriptors
        groups.setdefault((ds.Modality, ds.get("FrameOfReferenceUID", "")), []).append(image)
    library = ContainerContentItem(codes.DCM.ImageLibrary,
                                   relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = []
    for images in groups.values():
        group = ContainerContentItem(codes.DCM.ImageLibraryGroup,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
        group.ContentSequence = images
        library.ContentSequence.append(group)
    return library


# --- Reading ---------------------------------------------------------------------------------

def read_report(ds: Dataset) -> list[ReportedFinding]:
    """The findings of a TID 1500 report made by :func:`build_report`, one per Measurement Group.

    Walks the SR content tree (PS3.3 C.17.3) with pydicom alone: Imaging Measurements (DCM 126010)
    -> Measurement Group (DCM 125007, TID 1501) -> Finding (DCM 121071), the presence evaluation
    named after the finding, Certainty of Finding (DCM 111012) and Critical finding.
    """
    imaging = [item for item in ds.get("ContentSequence", [])
               if _name(item) == _IMAGING_MEASUREMENTS and item.ValueType == "CONTAINER"]
    if not imaging:
        raise ReportError("the SR has no Imaging Measurements container (DCM 126010) at its root; "
                          "it is not a TID 1500 Measurement Report")
    result = []
    for group in imaging[0].get("ContentSequence", []):
        if _name(group) != _MEASUREMENT_GROUP or group.ValueType != "CONTAINER":
            continue
        result.append(_read_group(group))
    return result


def _name(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _code_key(code: DicomCode) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def _code_value(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def _read_group(group: Dataset) -> ReportedFinding:
    items = list(group.get("ContentSequence", []))
    codes_ = [i for i in items if i.ValueType == "CODE"]
    finding_items = [i for i in codes_ if _name(i) == _FINDING]
    if not finding_items:
        raise ReportError("a Measurement Group has no Finding (DCM 121071) content item; "
                          "TID 1501 groups written by build_report always have one")
    fc = finding_items[0].ConceptCodeSequence[0]
    finding = Code(value=str(fc.CodeValue), scheme=str(fc.CodingSchemeDesignator),
                   meaning=str(fc.CodeMeaning))
    label = f"{finding.meaning} ({finding.scheme} {finding.value})"

    presence = [i for i in codes_ if _name(i) == (finding.value, finding.scheme)]
    if not presence:
        raise ReportError(f"the Measurement Group for {label} states no presence (a CODE item "
                          "named after the finding with value Present or Absent)")
    value = _code_value(presence[0])
    if value in _PRESENT_VALUES:
        present = True
    elif value in _ABSENT_VALUES:
        present = False
    else:
        raise ReportError(f"the presence of {label} is coded {value[1]} {value[0]}, "
                          "not Present or Absent (CID 240)")

    certainty = [i for i in items
                 if i.ValueType == "NUM" and _name(i) == _code_key(CERTAINTY_OF_FINDING)]
    if not certainty or not certainty[0].get("MeasuredValueSequence"):
        raise ReportError(f"the Measurement Group for {label} has no Certainty of Finding "
                          "(DCM 111012) value")
    measured = certainty[0].MeasuredValueSequence[0]
    number = float(measured.FloatingPointValue if "FloatingPointValue" in measured
                   else measured.NumericValue)
    unit = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
    if unit == "%":
        probability = number / 100.0
    elif unit == "1":
        probability = number
    else:
        raise ReportError(f"Certainty of Finding for {label} is in unit {unit!r}; expected UCUM "
                          "'%' or '1'")

    critical = None
    flags = [i for i in codes_ if _name(i) == _code_key(CRITICAL_FINDING)]
    if flags:
        critical = _code_value(flags[0]) == _code_key(YES)
    return ReportedFinding(finding=finding, present=present, probability=probability,
                           critical=critical)
