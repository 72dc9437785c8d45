"""`ichbatch models fit-domain` and `models calibrate`: what a bundle learns about its own outputs.

The studies go through the same study path as `run` (same decoding, same TTA views) with each slice's
raw scores and pooled features kept; domain_check.fit_domain turns the features into the check stored
in the bundle, calibration.fit_calibration the scores and labels into the card's Platt parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .discover import discover
from .domain import SeriesChoice, SliceId
from .evaluate import load_labels
from .model.bundle import ModelCard, attach_domain, resolve, update_card
from .model.calibration import fit_calibration
from .model.domain_check import fit_domain
from .series import choose_series, group_studies
from .study import Engine, RunSettings, StudyPath

log = logging.getLogger(__name__)


def _scored(bundle: str, inputs: Sequence[Path], tta: int | None,
            progress: Callable[[int, int], None] | None) -> tuple[Engine, list[tuple[SeriesChoice, tuple[SliceId, ...],
                                                                               np.ndarray, np.ndarray]]]:
    folder = resolve(bundle)
    studies = group_studies(discover(inputs).instances)
    settings = RunSettings(model=str(folder), tta=tta, features=True)
    engine = Engine(settings)
    scored = []
    try:
        # Studies without a usable series, or outside the card's rules, have no features: features() skips them.
        choices = (choose_series(series, settings.rules) for series in studies.values())
        for n, item in enumerate(StudyPath(engine).features(choices), 1):
            scored.append(item)
            if progress:
                progress(n, len(studies))
    finally:
        engine.close()
    return engine, scored


def fit_bundle_domain(bundle: str, inputs: Sequence[Path], fitted_on: str, tta: int | None = None,
                      dims: int = 64, quantile: float = 0.99, margin: float = 1.25, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> ModelCard:
    engine, scored = _scored(bundle, inputs, tta, progress)
    fit = fit_domain([feats for *_, feats in scored], dims=dims, quantile=quantile, margin=margin, seed=seed)
    summary = {**fit.summary(), "fitted_on": fitted_on}
    log.info("domain check: threshold %.3f, %.1f%% of held-out studies outside", fit.check.threshold,
             100 * summary["held_out_outside"])  # type: ignore[operator]
    return attach_domain(resolve(bundle), fit.check, summary)


def calibrate_bundle(bundle: str, inputs: Sequence[Path], labels: Path, fitted_on: str, tta: int | None = None,
                     seed: int = 0, progress: Callable[[int, int], None] | None = None) -> ModelCard:
    """Platt parameters per output from labelled studies (a labels file that `evaluate` reads, with
    study_uid and slice: 1-based in inferior-to-superior order, as --slices writes them)."""
    table = load_labels(labels)
    if not {"study_uid", "slice"} <= set(table.columns):
        raise ValueError(f"{labels.name}: calibration needs slice labels keyed by study_uid and slice")
    keyed = table.set_index(["study_uid", "slice"])
    engine, scored = _scored(bundle, inputs, tta, progress)
    outputs = engine.bundle.card.outputs
    missing = [o for o in outputs if o not in keyed.columns]
    if missing:
        raise ValueError(f"{labels.name} has no labels for the model's outputs {missing}")
    studies = []
    for choice, idents, probs, _ in scored:
        keys = [(choice.study.study_uid, i.index) for i in idents]
        found = [k in keyed.index for k in keys]
        if all(found):
            studies.append((keyed.loc[keys, list(outputs)].to_numpy(np.float64), probs))
    fit = fit_calibration(studies, outputs, seed=seed)
    entry = {**fit.card_entry(fitted_on), "tta": engine.tta}
    return update_card(resolve(bundle), calibration=entry)
