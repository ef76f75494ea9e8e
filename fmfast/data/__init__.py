"""Data, in the order it flows: files (``matfile``, ``v1``, ``v2``, ``csvfiles`` with ``stamps``,
``video`` behind its child-process ``probe``) ->
frame store and sample index (``corpus``, ``dataset.FMFDataset``) -> the one batch gather
(``gather``; clip windows in ``window``). Also own recordings into the V2 layout (``ingest``,
``writer``), the synthetic furnace benchmark (``furnace``, ``synthetic``, ``cache``), and
``check`` (every problem of a dataset or recording, for ``fmfast check``). Every reader
validates what it reads: bad input is a DataError naming the file, the place and the problem.

May import: ``fmfast.errors``, ``fmfast.files``, ``fmfast.progress``. Not nn/, models/,
engine/, detect/ or cli/.
"""
from fmfast.errors import DataError

from .dataset import FMFDataset


def __getattr__(name):
    # generate is imported on first use, so that `python -m fmfast.data.synthetic` runs cleanly
    if name == "generate":
        from .synthetic import generate

        return generate
    raise AttributeError(f"module 'fmfast.data' has no attribute {name!r}")


__all__ = ["FMFDataset", "DataError", "generate"]
