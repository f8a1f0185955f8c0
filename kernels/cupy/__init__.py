"""CUDA C kernels compiled at run time through CuPy (NVRTC): one ``<op>.cu`` source and its
``<op>.py`` launcher per op (spmm_csr, nm_linear); ``_module`` compiles and launches them,
importing CuPy on the first launch."""
