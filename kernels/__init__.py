"""Triton kernels, each beside its pure-torch reference.

Kept free of imports and side effects: transformers probes for an unrelated PyPI package
that is also called `kernels` and imports whatever it finds under that name.
"""
