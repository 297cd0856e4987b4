"""Detectors: pure-PyTorch RTMDet / RTMDet-Ins (`registry.build_detector`) and checkpoint I/O (`checkpoint`)."""
