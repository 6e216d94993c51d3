"""Optional fast paths for talking-heads attention; the model runs without them.

``talking_heads`` holds the autograd function and its Python path, ``native`` builds and
loads the C++ CPU kernel in ``csrc/``, ``cpu_workers`` the single-threaded worker pool the
Python path shares its chunks over.
"""

from cait.kernels.talking_heads import CPU_CHUNK_BYTES, talking_heads_attention

__all__ = ["CPU_CHUNK_BYTES", "talking_heads_attention"]
