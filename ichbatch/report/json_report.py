"""One JSON result per study, for systems that take neither CSV nor DICOM.

The schema is versioned (`schema`: "ichbatch.study-result/1") and described in docs/result-schema.json;
a field is only ever added within a version. Identifiers follow --pseudonymize like the CSV. Written
atomically beside the PDF as study_<UID>.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import NOT_FOR_DIAGNOSIS, __version__
from ..domain import Status, StudyResult
from .csv_report import notice, pseudonym
from .files import atomic_write_bytes, safe_stem

SCHEMA = "ichbatch.study-result/1"


def json_name(study_uid: str) -> str:
    return f"study_{safe_stem(study_uid)}.json"


def result_json(result: StudyResult, pseudonym_key: bytes | None = None) -> dict:
    study = result.study
    ids = {"patient_id": study.patient_id, "accession": study.accession}
    if pseudonym_key is not None:
        ids = {k: pseudonym(v, pseudonym_key) for k, v in ids.items()}
    assessed = result.status == Status.OK
    findings = []
    for label in result.labels:
        p = result.study_probs.get(label)
        findings.append({
            "label": label,
            "assessed": assessed and p is not None,
            "probability": round(float(p), 6) if assessed and p is not None else None,
            "flagged": bool(result.flags.get(label)) if assessed and result.flags.get(label) is not None else None,
            "threshold": result.thresholds.get(label),
        })
    return {
        "schema": SCHEMA,
        "notice": NOT_FOR_DIAGNOSIS,
        "generator": {"name": "ichbatch", "version": __version__},
        "model": {"name": result.model, "version": result.model_version, "trained": result.model_trained,
                  "trained_on": result.model_trained_on, "tta": result.tta},
        "study": {"study_uid": study.study_uid, "study_date": study.study_date, **ids},
        "series": {"series_uid": result.series_uid, "description": result.series_description,
                   "slices_scored": result.n_slices},
        "input": {"source": result.source or None, "hounsfield_units": not result.source},
        "status": result.status.value,
        "message": result.message,
        "findings": findings,
        "domain": {"score": result.domain_score, "threshold": result.domain_threshold},
        "key_slices": [{"sop_instance_uid": k.sop_uid, "instance_number": k.instance_number, "z_mm": k.z_mm,
                        "frame": k.frame, "place": k.index} for k in result.key_slices],
        "heat_map_method": result.heatmap,
        "report_pdf": result.report_pdf,
        "summary": notice(result),
    }


def write_json(result: StudyResult, folder: Path, pseudonym_key: bytes | None = None) -> Path:
    path = Path(folder) / json_name(result.study.study_uid)
    text = json.dumps(result_json(result, pseudonym_key), indent=1, ensure_ascii=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))
    return path
