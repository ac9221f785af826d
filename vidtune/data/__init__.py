"""Data: manifests (pyarrow), video decoding (decord, PyAV), clip datasets, synthetic sets."""
