"""FMF data: the benchmark's V2 and V1 layouts as batched tensors, and a synthetic furnace."""
from .dataset import FMFDataset
from .errors import DataError


def __getattr__(name):
    # generate is imported on first use, so that `python -m fmfast.data.synthetic` runs cleanly
    if name == "generate":
        from .synthetic import generate

        return generate
    raise AttributeError(f"module 'fmfast.data' has no attribute {name!r}")

__all__ = ["FMFDataset", "DataError", "generate"]
