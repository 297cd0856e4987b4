"""The committed protobuf code matches proto/*.proto (regenerate with `make proto`)."""
from __future__ import annotations

from service.protocols.grpc import generate


def test_generated_code_is_in_sync(tmp_path):
    fresh = {p.name: p.read_text() for p in generate.generate(tmp_path)}
    committed = {p.name: p.read_text() for p in generate.OUT_DIR.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"out of date with proto/: {stale}; run `make proto`"


def test_generated_imports_are_package_relative():
    text = (generate.OUT_DIR / "detserve_pb2_grpc.py").read_text()
    assert "from . import detserve_pb2" in text and "\nimport detserve_pb2" not in text
