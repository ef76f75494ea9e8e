"""Triton, or a stand-in where it does not install (macOS, Windows, CPU-only wheels of torch).

The kernel files import ``triton`` and ``tl`` from here, so that their plain-PyTorch ``*_ref``
twins, their autograd wrappers and their custom-op registrations import everywhere: without
Triton, the ``@triton.jit`` definitions and ``tl.constexpr`` annotations still evaluate, and
only launching a kernel raises. ``HAVE_TRITON`` says which one this is; callers choose the
reference path when it is False.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # (a broken install raises other errors, which should surface)
    HAVE_TRITON = False

    class _Missing:
        """Any attribute (``tl.constexpr``, ``tl.float32``) is another stand-in; launching raises."""

        def __init__(self, name: str):
            self._name = name

        def __getattr__(self, attr: str) -> _Missing:
            return _Missing(f"{self._name}.{attr}")

        def __getitem__(self, grid) -> _Missing:  # kernel[grid]
            return self

        def __call__(self, *args, **kwargs):
            raise ImportError(f"{self._name}: Triton is not installed, so its kernels cannot run; "
                              "install triton (Linux) or use the reference / fused backends")

    class _Triton(_Missing):
        @staticmethod
        def jit(fn=None, **options):
            if fn is None:  # @triton.jit(...)
                return lambda f: _Missing(f.__name__)
            return _Missing(fn.__name__)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

    triton = _Triton("triton")
    tl = _Missing("triton.language")

__all__ = ["HAVE_TRITON", "triton", "tl"]
