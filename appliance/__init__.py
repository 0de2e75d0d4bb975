"""An edge inference appliance for medical imaging: a DICOM node that runs trained models on the
images it receives and returns the results as DICOM structured reports."""

__version__ = "0.1.0"
