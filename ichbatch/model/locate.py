"""Where model bundles are found, in one place: a path given to --model, $ICHBATCH_MODELS, ./models in
the working directory, and the bundles installed with the package (the shipped demo and the untrained
stand-in travel as package data, so `ichbatch demo` works from any directory after `pip install .`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BundleError

CARD = "model.json"
DEFAULT_MODEL = "ich-resnet50-demo"
FALLBACK_MODEL = "ich-resnet50-untrained"


def packaged_models_dir() -> Path:
    """The bundles installed with ichbatch (the repository's models/ folder, as package data)."""
    from importlib.resources import files

    try:
        return Path(str(files("ichbatch.bundled")))
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH, not installed: ./models is the one place
        return Path.cwd() / "models"


def models_dirs() -> list[Path]:
    """Where bundle names are looked up, first match wins: $ICHBATCH_MODELS, ./models, the package's."""
    dirs = [Path(p) for p in os.environ.get("ICHBATCH_MODELS", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "models", packaged_models_dir()]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def resolve(name_or_path: str) -> Path:
    """A bundle name (looked up in models_dirs) or a path to a bundle folder."""
    path = Path(name_or_path)
    if (path / CARD).is_file():
        return path
    for folder in models_dirs():
        if (folder / name_or_path / CARD).is_file():
            return folder / name_or_path
    if path.exists():
        raise BundleError(f"{path} is not a model bundle: it has no {CARD}")
    names = ", ".join(sorted(n for n, _ in list_bundles())) or "none"
    raise BundleError(f"no model bundle named {name_or_path!r} (installed: {names}); pass a name or a folder")


def list_bundles() -> list[tuple[str, Path]]:
    found: dict[str, Path] = {}
    for folder in models_dirs():
        if folder.is_dir():
            for card in sorted(folder.glob(f"*/{CARD}")):
                found.setdefault(card.parent.name, card.parent)
    return sorted(found.items())


def default_model() -> str:
    """The shipped demo model, or the untrained stand-in where the demo's weights are not installed."""
    names = {name for name, _ in list_bundles()}
    return DEFAULT_MODEL if DEFAULT_MODEL in names else FALLBACK_MODEL
