"""Use ichbatch as a library: run a folder and print each study's result as it finishes.

    python examples/process_folder.py /path/to/studies

Research use only, not for diagnosis.
"""

from __future__ import annotations

import sys

from ichbatch.model.locate import default_model
from ichbatch.pipeline import RunSettings, process_folder


def main(folder: str) -> None:
    settings = RunSettings(model=default_model(), tta=1)

    def show(result) -> None:  # type: ignore[no-untyped-def]
        score = result.study_probs.get("any")
        print(f"{result.status.value:8} any={'n/a' if score is None else f'{score:.3f}'}  {result.message}")

    summary = process_folder([folder], settings, on_result=show)
    print(f"{summary.studies} studies, {summary.n_slices} slices, {summary.slices_per_second:.1f} slices/s")


if __name__ == "__main__":
    main(sys.argv[1])
