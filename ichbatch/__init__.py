"""ichbatch: batch intracranial-hemorrhage flagging on head CT DICOM.

Research use only. Results are not for diagnosis.
"""

__version__ = "0.1.0"

NOT_FOR_DIAGNOSIS = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
