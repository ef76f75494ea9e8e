"""Kernels of fmfast -- Triton for the GPU, C (built at first use) for the CPU -- one concept per
file, each with its custom op (and autograd where it trains) and a plain-PyTorch ``*_ref`` twin.
Installed as ``fmfast.kernels``; knows nothing of the model."""
