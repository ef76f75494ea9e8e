"""Triton kernels of fmfast, one concept per file, each with its autograd wrapper and a
plain-PyTorch ``*_ref`` twin. Installed as ``fmfast.kernels``; knows nothing of the model."""
