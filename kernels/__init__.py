"""Triton kernels. Launchers take tensors and explicit strides; they know nothing of models or schemas."""
