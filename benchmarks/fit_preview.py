"""Fit the toy model's live-preview map (latent channels -> RGB) and store it beside the server's code.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fit_preview.py     # about a minute on 2 CPU cores

Least squares from the final latents of 35 toy edits (5 scikit-image photos x the first English phrasing of
each of the toy's 7 tasks, 160^2) to their decoded pixels averaged over 8x8 blocks (serve/preview.py).
"""

from __future__ import annotations

from pathlib import Path

from skimage import data

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.serve import preview
from step1x_export.toy.tasks import TASKS


def main() -> None:
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    with Step1XEditRuntime.load("toy") as runtime:
        projection = preview.fit_projection(runtime, photos, [t.english[0] for t in TASKS])
    (Path(preview.__file__).parent / preview.FITTED["toy"]).write_text(projection.to_json(), encoding="utf-8")
    print(projection.fit)


if __name__ == "__main__":
    main()
