"""Detectors: the family contract and registry (`base`), the families (`rtmdet/`, ...) and checkpoint I/O."""
