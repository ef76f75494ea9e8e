"""fmfast: a fast, faithful FmFormer (video + arc current anomaly detection for fused magnesium
furnaces).

The package's folders follow the data path: ``data`` (files -> frame store -> batch gather),
``nn`` (drop-in modules that dispatch to the Triton kernels in ``kernels``), ``models``
(FmFormer, baselines, heads, checkpoint interop), ``engine`` (training step, trainer,
evaluation, checkpoints, metrics), ``detect`` (windows, sources, alarms, reports) and ``cli``
(the ``fmfast`` command). ``errors`` holds the library's exceptions, ``files`` atomic writes,
``progress`` the progress bars. ``fmfast.fit(...)`` trains as ``fmfast train`` does
(``fmfast.engine.api``).
"""
from fmfast.engine.predictor import Predictor
from fmfast.models import CurrentViT, FmFormer, ModelConfig, VideoViT, build_model, swap_modules

__version__ = "0.1.0"
__all__ = ["CurrentViT", "FmFormer", "ModelConfig", "Predictor", "VideoViT", "build_model", "fit", "swap_modules"]


def __getattr__(name):
    if name == "fit":  # the training stack is imported on first use (fmfast.engine.api)
        from fmfast.engine.api import fit

        return fit
    raise AttributeError(f"module 'fmfast' has no attribute {name!r}")
