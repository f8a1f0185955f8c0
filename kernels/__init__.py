"""Device code of sparqle: Triton kernels, CuPy launchers and the plain-PyTorch path.

Nothing here knows about autograd or backend choice; ``sparqle.bindings`` does.
Launchers of one op share one signature across ``triton/``, ``cupy/`` and ``torch/``.
"""
