"""Triton kernels of fastunlearn, installed as ``fastunlearn.triton_kernels``.

Kernels and launchers only (tensors in, tensors out). Importing this package does not import
Triton; each kernel module does, so a machine without Triton can still import fastunlearn.
"""
