"""growlib's ops, one module each: the Triton kernel, its launcher, the PyTorch reference, the validation and the
torch.library op live together, named after the op.

* Weight maps, the two kernel families the growth operators run on:
  ``structured_map`` (every sparse width/depth map: coalesce, de-coalesce, interpolation, Net2Net, stacking,
  ...) and ``kron_expand`` (LiGO's learned Kronecker-factored expansion, forward and backward).
* ``frozen/``: the forward-only fused blocks a frozen layer runs through (``add_norm``, ``activation``,
  ``rope_split_qkv``), used by growlib.frozen.
* ``backend`` (Triton or the reference), ``launch`` (GPU facts, launch records), ``cases`` (every
  kernel-versus-reference case) and ``check`` (``growlib check-kernels``).
"""
