"""Tensor functions under BitLinear: the quantizer formulas, Triton kernels + PyTorch reference, dispatch.

The lowest layer: it imports nothing from bitnet/, tasks/ or flows/ (tests/test_layout.py checks it); ``triton``
is optional, and without it every path runs in PyTorch.
"""
