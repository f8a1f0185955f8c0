"""CUDA C kernels compiled at run time through CuPy (NVRTC), one ``<op>.py`` launcher
and ``<op>.cu`` source per op. No op has a CuPy kernel yet; forcing the ``cupy``
backend says so."""
