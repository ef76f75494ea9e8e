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


def __getattr__(name):
    # imported on first use: `import fmfast` stays light (no h5py) and `python -m
    # fmfast.data.synthetic` runs cleanly
    if name == "FMFDataset":
        from .dataset import FMFDataset

        return FMFDataset
    if name == "generate":
        from .synthetic import generate

        return generate
    raise AttributeError(f"module 'fmfast.data' has no attribute {name!r}")


__all__ = ["FMFDataset", "DataError", "generate"]
