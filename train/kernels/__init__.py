"""Owns the compute kernels: Triton LoRA-dropout kernels, the fused 4-bit LoRA linear, lean dropout, varlen attention."""
