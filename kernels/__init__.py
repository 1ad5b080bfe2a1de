"""Triton kernels, each file holding the kernel, its launcher and the plain-PyTorch reference beside it."""
