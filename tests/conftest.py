import os

# Triton kernels run on the CPU through the interpreter; this must be set before any
# kernel module is imported (the @triton.jit decorator reads it at definition time).
os.environ.setdefault("TRITON_INTERPRET", "1")
