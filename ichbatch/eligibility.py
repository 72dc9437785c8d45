"""Stage 3 gate: is a selected series something the model was made for? The model card's rules.

Checked per study on the headers alone, before anything is decoded. A study that breaks a rule is
not run: its result says `not_assessed` with the rule and the values that broke it. A rule can only
fail on a value the headers hold: a missing BodyPartExamined (common after anonymisation) passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .domain import InstanceRef, SeriesChoice
from .images import is_image


@dataclass(frozen=True)
class Eligibility:
    """A card's `eligibility`; every rule is optional (None or empty: not checked)."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    slice_thickness_mm: tuple[float, float] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    kvp: tuple[float, float] | None = None
    contrast: bool = True  # False: a series with a contrast agent in its headers is not assessed
    min_slices: int = 1
    max_slices: int | None = None
    windowed_images: bool = False  # True: the model also takes 8-bit windowed images (not HU)
    notes: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Eligibility:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"eligibility must be an object of rules. Received: {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"eligibility has unknown rule(s) {sorted(unknown)}")
        values = dict(data)
        for key in ("modalities", "body_parts"):
            if key in values:
                values[key] = tuple(str(v).upper() for v in values[key])
        for key in ("slice_thickness_mm", "pixel_spacing_mm", "kvp"):
            if values.get(key) is not None:
                values[key] = _range(key, values[key])
        rules = cls(**values)
        if not isinstance(rules.min_slices, int) or rules.min_slices < 1:
            raise ValueError(f"eligibility min_slices must be a whole number of at least 1. Received: {rules.min_slices!r}")
        return rules

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("modalities", "body_parts"):
            data[key] = list(data[key])
        for key in ("slice_thickness_mm", "pixel_spacing_mm", "kvp"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    def problem(self, choice: SeriesChoice) -> str:
        """'' when the study may be run; otherwise the first broken rule, in words."""
        if choice.series is None:
            return ""
        instances = choice.series.instances
        if is_image(instances[0]):
            return "" if self.windowed_images else \
                "a plain image (8-bit, not Hounsfield units); the model is made for CT in Hounsfield units only"
        n = len(choice.slices)
        if n < self.min_slices:
            return f"{n} slices; the model needs at least {self.min_slices}"
        if self.max_slices is not None and n > self.max_slices:
            return f"{n} slices; the model takes at most {self.max_slices}"
        first = instances[0]
        if self.modalities and first.modality not in self.modalities:
            return f"modality {first.modality or 'missing'}; the model is for {'/'.join(self.modalities)}"
        parts = {i.body_part for i in instances if i.body_part}
        if self.body_parts and parts - set(self.body_parts):
            return (f"body part {'/'.join(sorted(parts))}; the model is for "
                    f"{'/'.join(self.body_parts)}")
        if not self.contrast and any(i.contrast_agent.strip() for i in instances):
            return "contrast-enhanced series; the model is for non-contrast CT"
        for label, rng, value in (("slice thickness", self.slice_thickness_mm, _values(instances, "slice_thickness")),
                                  ("pixel spacing", self.pixel_spacing_mm, _values(instances, "pixel_spacing")),
                                  ("tube voltage", self.kvp, _values(instances, "kvp"))):
            text = _outside(label, rng, value)
            if text:
                return text
        return ""


def _values(instances: tuple[InstanceRef, ...], name: str) -> tuple[float, float] | None:
    values = [v for v in (getattr(i, name) for i in instances) if v is not None]
    return (min(values), max(values)) if values else None


def _outside(label: str, rng: tuple[float, float] | None, seen: tuple[float, float] | None) -> str:
    if rng is None or seen is None:
        return ""
    lo, hi = seen
    if lo < rng[0] or hi > rng[1]:
        shown = f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"
        return f"{label} {shown}; the model is for {rng[0]:g} to {rng[1]:g}"
    return ""


def _range(key: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"eligibility {key} must be [low, high]. Received: {value!r}") from None
    if not lo <= hi:
        raise ValueError(f"eligibility {key} must have low <= high. Received: {value!r}")
    return lo, hi


__all__ = ["Eligibility"]
