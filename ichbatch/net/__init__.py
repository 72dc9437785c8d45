"""DICOM networking: receiving studies (scp.py) and delivering results (deliver.py)."""
