"""Saying when a result cannot be trusted (#16): the card's eligibility rules, the feature-space domain
check of the shipped demo bundle, and heat maps drawn on one scale for flagged labels only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from pypdf import PdfReader

from ichbatch.cli import main
from ichbatch.errors import BundleError
from ichbatch.model.bundle import read_card
from ichbatch.synth import synth_studies

from .conftest import write_series

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
DEMO = Path(__file__).resolve().parents[1] / "models" / "ich-resnet50-demo"


def _card_copy(bundle: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(bundle, dest)
    card = json.loads((dest / "model.json").read_text())
    card.update(changes)
    (dest / "model.json").write_text(json.dumps(card))
    return dest


def _run(inputs: list[Path], out: Path, bundle: Path, *extra: str) -> pd.DataFrame:
    reports = [] if "--no-reports" in extra else ["--reports", str(out.with_suffix("")) + "_reports"]
    result = CliRunner().invoke(main, ["run", *map(str, inputs), "--out", str(out), "--model", str(bundle),
                                       "--tta", "1", *reports, *extra])
    assert result.exit_code in (0, 1), result.output
    return pd.read_csv(out, dtype=str, keep_default_na=False).set_index("study_uid")


def test_studies_outside_the_card_rules_are_not_run_and_say_which_rule(tmp_path, tiny_bundle, phantom_hu):
    rules = {"modalities": ["CT"], "body_parts": ["HEAD"], "contrast": False, "slice_thickness_mm": [1, 6]}
    bundle = _card_copy(tiny_bundle, tmp_path / "ruled", eligibility=rules)
    head, chest, contrast, thin = (generate_uid() for _ in range(4))
    write_series(tmp_path / "in" / "a", phantom_hu[:9], study_uid=head, series_uid=generate_uid())
    write_series(tmp_path / "in" / "b", phantom_hu[:9], study_uid=chest, series_uid=generate_uid())
    write_series(tmp_path / "in" / "c", phantom_hu[:9], study_uid=contrast, series_uid=generate_uid())
    write_series(tmp_path / "in" / "d", phantom_hu[:9], study_uid=thin, series_uid=generate_uid(), thickness=10.0)
    for folder, name, value in (("b", "BodyPartExamined", "CHEST"), ("c", "ContrastBolusAgent", "IOHEXOL")):
        for p in (tmp_path / "in" / folder).iterdir():
            ds = pydicom.dcmread(p)
            setattr(ds, name, value)
            ds.save_as(p)
    rows = _run([tmp_path / "in"], tmp_path / "r.csv", bundle)
    assert rows.loc[head, "status"] == "ok" and rows.loc[head, "prob_any"] != ""
    for uid, words in ((chest, "body part CHEST; the model is for HEAD"),
                       (contrast, "contrast-enhanced series"),
                       (thin, "slice thickness 10; the model is for 1 to 6")):
        row = rows.loc[uid]
        assert row["status"] == "not_assessed" and words in row["message"], row["message"]
        assert row["flag_any"] == "not_assessed" and row["prob_any"] == "" and row["n_slices"] == "0"
        text = PdfReader(row["report_pdf"]).pages[0].extract_text()
        assert "NOT ASSESSED: this study is not one the model can judge" in text and words in " ".join(text.split())


def test_bad_eligibility_rules_are_refused_with_a_message(tmp_path, tiny_bundle):
    bundle = _card_copy(tiny_bundle, tmp_path / "bad", eligibility={"kvp": [150, 70]})
    with pytest.raises(BundleError, match=r"eligibility kvp must have low <= high"):
        read_card(bundle)
    (bundle / "model.json").write_text(json.dumps({**json.loads((bundle / "model.json").read_text()),
                                                   "eligibility": {"colour": True}}))
    with pytest.raises(BundleError, match=r"unknown rule\(s\) \['colour'\]"):
        read_card(bundle)


@pytest.mark.timeout(900)
def test_shipped_demo_does_not_flag_real_normal_heads_and_assesses_only_head_ct(tmp_path):
    """The real normal heads (GE human head series with gantry tilt, Philips head phantom), which the
    demo never saw, are not flagged for 'any'; held-out anatomy phantoms are in domain; the MR, the RGB
    captures and a generated study labelled CHEST are not assessed, each with the reason."""
    if not REALDATA.exists():
        pytest.skip(f"{REALDATA} is not here")
    manifest = synth_studies(tmp_path / "gen", 6, seed=303, phantoms="anatomy")
    chest = synth_studies(tmp_path / "chest", 1, seed=304, phantoms="anatomy")["studies"][0]["study_uid"]
    for p in (tmp_path / "chest").rglob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.BodyPartExamined = "CHEST"
        ds.save_as(p)
    heads = [REALDATA / "dcm_qa_ct" / "GE_HiSpeed_human_head_tilt", REALDATA / "dcm_qa_ct" / "Philips_Ingenuity_head_phantom"]
    inputs = [tmp_path / "gen", tmp_path / "chest", *heads, REALDATA / "dcm_qa_ts_mr", REALDATA / "deid_data"]
    rows = _run(inputs, tmp_path / "r.csv", DEMO, "--no-reports")
    generated = rows.loc[[s["study_uid"] for s in manifest["studies"]]]
    assert (generated["status"] == "ok").mean() >= 0.8, generated[["status", "domain_score"]]
    real = rows.loc[sorted({ds.StudyInstanceUID for h in heads for f in h.rglob("*") if f.is_file()
                            for ds in [pydicom.dcmread(f, stop_before_pixels=True, force=True)]
                            if ds.get("Modality") == "CT" and "StudyInstanceUID" in ds})]
    assert len(real) == 2
    # Not flagged: assessed and negative, or not assessed with the reason; never a positive 'any'.
    assert (real["flag_any"].isin(["0", "not_assessed"])).all(), real[["flag_any", "prob_any", "message"]]
    assert all("outside the data model" in m for m in real.loc[real["flag_any"] == "not_assessed", "message"])
    others = rows.drop(index=generated.index).drop(index=real.index)
    assert len(others) >= 3  # chest, MR, the RGB captures
    assert (others["flag_any"] == "not_assessed").all() and all(m for m in others["message"])
    assert "body part CHEST" in rows.loc[chest, "message"]


def _page_images(pdf: str) -> list[np.ndarray]:
    return [np.asarray(im.image.convert("RGB")).astype(int) for im in PdfReader(pdf).pages[0].images]


def _colourful(image: np.ndarray) -> bool:
    return int((image.max(axis=2) - image.min(axis=2)).max()) > 60


def test_heat_maps_only_for_flagged_labels_on_one_scale_with_a_colour_bar(tmp_path, tiny_bundle, phantom_hu):
    from ichbatch.model.bundle import load_bundle, write_bundle
    from ichbatch.model.resnet import HEAD_LAYER

    uid = generate_uid()
    write_series(tmp_path / "in", phantom_hu[:9], study_uid=uid, series_uid=generate_uid())
    # A head whose 'any' column weighs every (non-negative) feature positively: its class-activation
    # map is above zero wherever the slice has features, so an overlay, when drawn, has colour.
    bundle = load_bundle(str(tiny_bundle))
    kernel, bias = bundle.model.get_layer(HEAD_LAYER).get_weights()
    kernel[:, 0] = np.abs(kernel[:, 0])
    bundle.model.get_layer(HEAD_LAYER).set_weights([kernel, bias])
    evident = write_bundle(tmp_path / "evident", bundle.card, bundle.model)
    all_labels = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
    flags_all = _card_copy(evident, tmp_path / "low", thresholds={k: 0.01 for k in all_labels})
    flags_none = _card_copy(evident, tmp_path / "high", thresholds={k: 0.99 for k in all_labels})
    negative = _run([tmp_path / "in"], tmp_path / "neg.csv", flags_none).loc[uid]
    positive = _run([tmp_path / "in"], tmp_path / "pos.csv", flags_all).loc[uid]
    assert negative["flag_any"] == "0" and positive["flag_any"] == "1"
    neg_images, pos_images = _page_images(negative["report_pdf"]), _page_images(positive["report_pdf"])
    assert neg_images and not any(_colourful(im) for im in neg_images)  # key slices, no overlay
    overlays = [im for im in pos_images if _colourful(im) and im.shape[1] > 50]
    bars = [im for im in pos_images if im.shape[0] > 5 * im.shape[1]]
    assert len(overlays) == 3 and len(bars) == 1 and _colourful(bars[0])
    text = " ".join(PdfReader(positive["report_pdf"]).pages[0].extract_text().split())
    assert "heat map for 'any' (flagged)" in text and "one scale (0-1) for every study" in text
    assert "no heat map: no label is flagged" in " ".join(PdfReader(negative["report_pdf"]).pages[0].extract_text().split())


TYPES = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "null": type(None),
         "object": dict, "array": list}


def _check(value: object, schema: dict, where: str) -> None:
    """The parts of JSON Schema that docs/result-schema.json uses: type, const, enum, required, items."""
    if "const" in schema:
        assert value == schema["const"], where
    if "enum" in schema:
        assert value in schema["enum"], where
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(isinstance(value, TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                   for k in kinds), f"{where}: {value!r} is not {kinds}"
    for key in schema.get("required", []):
        assert isinstance(value, dict) and key in value, f"{where}: {key} missing"
    for key, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and key in value:
            _check(value[key], sub, f"{where}.{key}")
    if "items" in schema and isinstance(value, list):
        for k, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{k}]")


def test_a_versioned_json_result_per_study_matches_its_schema_and_the_csv(tmp_path, tiny_bundle, phantom_hu):
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "result-schema.json").read_text())
    ok, chest = generate_uid(), generate_uid()
    write_series(tmp_path / "in" / "a", phantom_hu[:9], study_uid=ok, series_uid=generate_uid())
    write_series(tmp_path / "in" / "b", phantom_hu[:9], study_uid=chest, series_uid=generate_uid())
    for p in (tmp_path / "in" / "b").iterdir():
        ds = pydicom.dcmread(p)
        ds.BodyPartExamined = "CHEST"
        ds.save_as(p)
    bundle = _card_copy(tiny_bundle, tmp_path / "ruled", eligibility={"body_parts": ["HEAD"]})
    rows = _run([tmp_path / "in"], tmp_path / "r.csv", bundle)
    for uid in (ok, chest):
        pdf = Path(rows.loc[uid, "report_pdf"])
        result = json.loads(pdf.with_suffix(".json").read_text())
        _check(result, schema, "result")
        assert result["schema"] == "ichbatch.study-result/1" and result["study"]["study_uid"] == uid
        assert result["status"] == rows.loc[uid, "status"] and result["report_pdf"] == str(pdf)
        any_finding = next(f for f in result["findings"] if f["label"] == "any")
        if uid == ok:
            assert any_finding["probability"] == pytest.approx(float(rows.loc[uid, "prob_any"]), abs=1e-4)
            assert any_finding["flagged"] == (rows.loc[uid, "flag_any"] == "1")
            assert [k["sop_instance_uid"] for k in result["key_slices"]] == rows.loc[uid, "key_sop_uids"].split()
        else:
            assert any_finding == {"label": "any", "assessed": False, "probability": None, "flagged": None,
                                   "threshold": 0.5}
            assert "body part CHEST" in result["message"]
