"""Speed benchmarks: NumPy (and CuPy) against PyTorch in the same process."""
