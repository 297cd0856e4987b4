"""The committed protobuf code matches proto/*.proto (regenerate with `make proto`)."""
from __future__ import annotations

import re

from service.protocols.grpc import generate

# protoc stamps its own version into the output; a newer grpcio-tools than the one that generated
# the committed code is not drift, so those stamps are left out of the comparison.
_STAMPS = re.compile(r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*)$|"
                     r"ValidateProtobufRuntimeVersion\([^)]*\)", re.MULTILINE)


def _unstamped(text: str) -> str:
    return _STAMPS.sub("<version>", text)


def test_generated_code_is_in_sync(tmp_path):
    fresh = {p.name: _unstamped(p.read_text()) for p in generate.generate(tmp_path)}
    committed = {p.name: _unstamped(p.read_text()) for p in generate.OUT_DIR.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"out of date with proto/: {stale}; run `make proto`"


def test_generated_imports_are_package_relative():
    text = (generate.OUT_DIR / "detserve_pb2_grpc.py").read_text()
    assert "from . import detserve_pb2" in text and "\nimport detserve_pb2" not in text
