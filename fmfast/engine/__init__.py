"""Training and evaluation: the one training step (``step``; eager and CUDA-graph-captured share
it, ``graphs`` holds the capture mechanics), the trainer and its run folders, the evaluation
loop, checkpoints, metrics, plots, settings, optimisers, distributed set-up and export.

May import: ``fmfast.data``, ``fmfast.models``, ``fmfast.nn``, ``fmfast.errors``,
``fmfast.files``, ``fmfast.progress``. Not detect/ or cli/.
"""
