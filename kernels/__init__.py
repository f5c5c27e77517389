"""Triton kernels of svnr_fast (installed as svnr_fast.kernels); imported on first use, never at package import."""
