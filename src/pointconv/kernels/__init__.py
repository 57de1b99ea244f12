"""Triton kernels, one module per family. Imported lazily: never on a CPU-only path."""
