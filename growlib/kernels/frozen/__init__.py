"""The forward-only fused ops of a frozen layer (growlib.frozen): norm with the residual add, bias/gated
activation, QKV split with rotary embedding.  No backward: a frozen layer needs none."""
