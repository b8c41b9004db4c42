"""The VM tier: tests on a distribution kernel, in a QEMU guest (runner.py)."""
