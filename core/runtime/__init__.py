"""The engine: configuration, residency, the Klotski pipeline, compute, the Python API."""
