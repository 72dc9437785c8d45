"""Held-out phantom evaluation of a bundle: study-level AUC per label and Grad-CAM localisation.

    python benchmarks/phantom_holdout.py [--model ich-resnet50-demo] [--studies 80] [--seed 777]
                                         [--cam-layers conv2_block3_out,conv3_block4_out]
                                         [--cam-augment hflip,vflip,hvflip] [--cam-method hirescam]
                                         [--phantoms ellipse|anatomy|anatomy-v2|anatomy-v3] [--record]
                                         [--cam-precision bfloat16]

Generates phantom studies with a seed the demo model never saw, runs the pipeline on them, and
reports study-level ROC AUC per label and, for true-positive slices (label 'any' present and slice
probability at the card's threshold), how often the Grad-CAM peak falls inside the lesion mask, for the
card's cam_layer and any --cam-layers to compare, each with the card's cam_method (or --cam-method) and
cam_augment flips (or --cam-augment; "none" for none) and, for comparison, without them. Choose layer,
method and flips on a tuning seed, not on the held-out one. --cam-precision adds the card's maps computed
by the model loaded in that precision (named "...@bfloat16"), and how often its peak is the same pixel.
--record writes the figures into the bundle's card under metrics.holdout (holdout_anatomy, holdout_anatomy_v2 or
holdout_anatomy_v3 for the anatomy kinds; the weights are unchanged).
These are figures on synthetic phantoms only: they say nothing about accuracy on real patients.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ichbatch.config import PHANTOM_KINDS  # noqa: E402  (light: no TensorFlow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ich-resnet50-demo")
    parser.add_argument("--studies", type=int, default=80)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--tta", type=int, default=2)
    parser.add_argument("--cam-layers", default="", help="comma-separated extra layers to compare, each layer[:method]")
    parser.add_argument("--cam-augment", default=None, help="comma-separated flips instead of the card's, or none")
    parser.add_argument("--cam-method", default=None, help="gradcam or hirescam instead of the card's")
    parser.add_argument("--phantoms", choices=PHANTOM_KINDS, default="ellipse",
                        help="which generator makes the held-out studies (ichbatch.synth, ichbatch.anatomy)")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--cam-precision", default="", choices=["", "float32", "bfloat16", "float16"])
    args = parser.parse_args()

    import numpy as np

    from ichbatch.discover import discover
    from ichbatch.evaluate import roc_auc
    from ichbatch.model.gradcam import CamExplainer
    from ichbatch.model.bundle import CARD, load_bundle, resolve
    from ichbatch.pipeline import Engine, RunSettings, process_studies, select
    from ichbatch.pixels import load_hu
    from ichbatch.preprocess import resize_hu, windows_np
    from ichbatch.synth import load_masks, synth_studies

    engine = Engine(RunSettings(model=args.model, tta=args.tta))
    card = engine.bundle.card
    with tempfile.TemporaryDirectory() as tmp:
        manifest = synth_studies(Path(tmp), args.studies, seed=args.seed, phantoms=args.phantoms)
        masks = load_masks(Path(tmp))
        truth = {s["study_uid"]: s for s in manifest["studies"]}
        choices = {c.study.study_uid: c for c in select(discover([tmp]), engine.settings.rules)}
        results: list = []
        process_studies(list(choices.values()), engine, on_result=results.append)
        aucs = {}
        for label in card.outputs:
            y = [truth[r.study.study_uid]["labels"][label] for r in results]
            p = [r.study_probs[label] for r in results]
            aucs[label] = roc_auc(np.array(y), np.array(p))
        flips = card.cam_augment if args.cam_augment is None else tuple(
            x for x in args.cam_augment.split(",") if x and x != "none")
        method = args.cam_method or card.cam_method
        explainers = {}
        for spec in [card.cam_layer or "last"] + [x for x in args.cam_layers.split(",") if x]:
            layer, _, how = spec.partition(":")  # layer[:method]
            for augment in (flips, ()) if flips else ((),):
                name = f"{layer}:{how or method}" + ("+" + "+".join(augment) if augment else "")
                explainers[name] = CamExplainer(engine.bundle.model, None if layer == "last" else layer, augment, how or method)
        if args.cam_precision:
            other = load_bundle(args.model, args.cam_precision).model
            main = next(iter(explainers))
            explainers[f"{main}@{args.cam_precision}"] = CamExplainer(
                other, card.cam_layer or None, flips, method)
        layers = list(explainers)
        same_peak: list[bool] = []
        hits: dict[str, list[tuple[str, bool]]] = {name: [] for name in layers}
        any_col = card.outputs.index("any")
        for r in results:
            mask = masks.get(r.study.study_uid)
            if mask is None or r.slice_probs is None:
                continue
            # Series slice k (0-based, z order): identities survive slices that failed to decode.
            tp = [ident.index - 1 for row, ident in enumerate(r.slices)
                  if mask[ident.index - 1].any() and r.slice_probs[row, any_col] >= card.thresholds["any"]]
            if not tp:
                continue
            kinds = {s["index"]: "+".join(s["labels"]) for s in truth[r.study.study_uid]["lesion_slices"]}
            refs = [choices[r.study.study_uid].slices[k] for k in tp]
            inputs = np.stack([windows_np(resize_hu(load_hu(ref).hu, card.input_size), card.windows) for ref in refs])
            scale = mask.shape[1] / card.input_size
            peaks: dict[str, list[tuple[int, int]]] = {}
            for name, explainer in explainers.items():
                for k, heat in zip(tp, explainer.maps(inputs, any_col)):
                    row, col = np.unravel_index(np.argmax(heat), heat.shape)
                    peaks.setdefault(name, []).append((int(row), int(col)))
                    hits[name].append((kinds[k], bool(mask[k][int(row * scale), int(col * scale)])))
            if args.cam_precision:
                same_peak += [a == b for a, b in zip(peaks[layers[0]], peaks[layers[-1]])]
    main_rows = hits[layers[0]]
    report = {
        "phantom_seed": args.seed, "phantoms": args.phantoms, "studies": args.studies, "tta": args.tta,
        "study_auc": {k: None if v is None else round(v, 4) for k, v in aucs.items()},
        "gradcam_layer": card.cam_layer or "last", "gradcam_augment": list(flips), "gradcam_method": method,
        "gradcam_peak_in_lesion": rate(main_rows), "true_positive_slices": len(main_rows),
        "gradcam_by_lesion": {kind: rate([x for x in main_rows if x[0] == kind])
                              for kind in sorted({kind for kind, _ in main_rows})},
        "gradcam_by_layer": {name: rate(rows) for name, rows in hits.items()},
        **({f"same_peak_at_{args.cam_precision}": round(float(np.mean(same_peak)), 4) if same_peak else None}
           if args.cam_precision else {}),
        "note": "synthetic phantoms only; not a measure of clinical accuracy",
    }
    print(json.dumps(report, indent=1))
    if args.record:
        folder = resolve(args.model)
        data = json.loads((folder / CARD).read_text())
        key = "holdout" if args.phantoms == "ellipse" else f"holdout_{args.phantoms.replace('-', '_')}"
        data.setdefault("metrics", {})[key] = report
        (folder / CARD).write_text(json.dumps(data, indent=2) + "\n")
        print(f"recorded in {folder / CARD}")


def rate(rows: list[tuple[str, bool]]) -> float | None:
    return None if not rows else round(sum(hit for _, hit in rows) / len(rows), 4)


if __name__ == "__main__":
    main()
