"""Writing an explain view's result (:class:`~nijimi.explain.panels.Explanation`) for ``nijimi explain …``: each
panel as ``DIR/<panel.name>.png``, the panels' grid as ``DIR/<view>.png`` and ``info`` as ``DIR/<view>.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nijimi.errors import OutputExistsError
from nijimi.explain.panels import Explanation, grid
from nijimi.io.files import atomic_write, check_output

GRID_COLUMNS = 4
"""Panels per row of the grid picture."""


def explanation_files(explanation: Explanation, out: str | os.PathLike) -> list[Path]:
    """The files :func:`write_explanation` writes for ``explanation`` into ``out``: the panels, the grid, the info."""
    folder = Path(out)
    names = [f"{panel.name}.png" for panel in explanation.panels]
    return [folder / name for name in [*names, f"{explanation.view}.png", f"{explanation.view}.json"]]


def write_explanation(explanation: Explanation, out: str | os.PathLike, overwrite: bool) -> list[Path]:
    """Write ``explanation`` into the folder ``out`` (created if missing), every file atomically; without
    ``overwrite`` an existing file is refused (OutputExistsError) before any is written, and a name taken meanwhile
    removes what this call wrote. Returns the paths written."""
    paths = explanation_files(explanation, out)
    for path in paths:
        check_output(path, overwrite)
    Path(out).mkdir(parents=True, exist_ok=True)
    images = [panel.image for panel in explanation.panels]
    images.append(grid(explanation.panels, GRID_COLUMNS))
    written: list[Path] = []
    try:
        for path, image in zip(paths, images, strict=False):
            with atomic_write(path, overwrite=overwrite) as f:
                image.save(f, format="PNG")
            written.append(path)
        with atomic_write(paths[-1], "w", overwrite=overwrite) as f:
            json.dump(explanation.info, f, indent=1, ensure_ascii=False)
            f.write("\n")
        written.append(paths[-1])
    except OutputExistsError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
