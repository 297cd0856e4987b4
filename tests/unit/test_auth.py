"""TokenAuth: which tokens open which API, and that checks do not leak through timing."""
from __future__ import annotations

import hmac

import pytest

from service.errors import ConfigError, PermissionDenied, Unauthenticated, http_status, grpc_status
from service.protocols.auth import TokenAuth, authorization_from_metadata, parse_bearer, read_token_file
from service.settings import AuthSettings, ServerSettings


def make_auth(**kwargs) -> TokenAuth:
    return TokenAuth.from_settings(AuthSettings(**kwargs))


def test_empty_sets_leave_both_apis_open():
    auth = make_auth()
    assert not auth.enabled("inference") and not auth.enabled("management")
    auth.check("inference", None)
    auth.check("management", "garbage")


def test_right_token_passes_on_its_own_api():
    auth = make_auth(inference_tokens=["inf-1", "inf-2"], management_tokens=["mgmt-1"])
    auth.check("inference", "Bearer inf-1")
    auth.check("inference", "bearer inf-2")  # the scheme is case-insensitive
    auth.check("management", "Bearer mgmt-1")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "inf-1", "Bearer a b"])
def test_missing_or_malformed_header_is_unauthenticated(header):
    auth = make_auth(inference_tokens=["inf-1"])
    with pytest.raises(Unauthenticated) as info:
        auth.check("inference", header)
    assert http_status(info.value) == 401 and grpc_status(info.value) == "UNAUTHENTICATED"


def test_unknown_token_is_unauthenticated():
    auth = make_auth(inference_tokens=["inf-1"], management_tokens=["mgmt-1"])
    with pytest.raises(Unauthenticated):
        auth.check("inference", "Bearer inf-2")
    with pytest.raises(Unauthenticated):
        auth.check("management", "Bearer inf-")


def test_token_of_the_other_api_is_permission_denied():
    auth = make_auth(inference_tokens=["inf-1"], management_tokens=["mgmt-1"])
    with pytest.raises(PermissionDenied) as info:
        auth.check("management", "Bearer inf-1")
    assert http_status(info.value) == 403
    with pytest.raises(PermissionDenied):
        auth.check("inference", "Bearer mgmt-1")


def test_only_management_protected_keeps_inference_open():
    auth = make_auth(management_tokens=["mgmt-1"])
    auth.check("inference", None)
    with pytest.raises(Unauthenticated):
        auth.check("management", None)


def test_token_files_one_per_line(tmp_path):
    inf = tmp_path / "inference.tokens"
    inf.write_text("# rotated 2026-11\ninf-file-1\n\n  inf-file-2  \n")
    mgmt = tmp_path / "management.tokens"
    mgmt.write_text("mgmt-file\n")
    assert read_token_file(inf) == ["inf-file-1", "inf-file-2"]
    auth = make_auth(inference_tokens=["inf-list"], inference_tokens_file=inf, management_tokens_file=mgmt)
    for token in ("inf-list", "inf-file-1", "inf-file-2"):
        auth.check("inference", f"Bearer {token}")
    auth.check("management", "Bearer mgmt-file")
    with pytest.raises(Unauthenticated):
        auth.check("inference", "Bearer # rotated 2026-11")


def test_missing_token_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="token file"):
        make_auth(inference_tokens_file=tmp_path / "absent")


def test_tokens_from_environment(monkeypatch, tmp_path):
    path = tmp_path / "mgmt"
    path.write_text("mgmt-env-file\n")
    monkeypatch.setenv("DETSERVE_AUTH__INFERENCE_TOKENS", '["inf-env"]')
    monkeypatch.setenv("DETSERVE_AUTH__MANAGEMENT_TOKENS_FILE", str(path))
    auth = TokenAuth.from_settings(ServerSettings().auth)
    auth.check("inference", "Bearer inf-env")
    auth.check("management", "Bearer mgmt-env-file")
    with pytest.raises(PermissionDenied):
        auth.check("inference", "Bearer mgmt-env-file")


def test_describe_never_prints_tokens():
    auth = make_auth(inference_tokens=["s3cret"])
    text = auth.describe()
    assert "s3cret" not in text and "inference: token auth on" in text and "management: open" in text


def test_grpc_metadata_lookup():
    assert authorization_from_metadata([("x-id", "1"), ("authorization", "Bearer t")]) == "Bearer t"
    assert authorization_from_metadata([("authorization", b"Bearer t")]) == "Bearer t"
    assert authorization_from_metadata(None) is None
    assert parse_bearer("Bearer  tok ") == "tok"


class CountingCompare:
    """Wraps hmac.compare_digest and records the lengths it saw."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((len(a), len(b)))
        return hmac.compare_digest(a, b)


@pytest.mark.parametrize("position", [0, 3, 7])
def test_every_configured_token_is_compared_wherever_the_match_is(position):
    inference = [f"inf-{i}" for i in range(8)]
    management = ["mgmt-a", "mgmt-b"]
    counter = CountingCompare()
    auth = TokenAuth(inference, management, compare=counter)
    auth.check("inference", f"Bearer {inference[position]}")
    assert len(counter.calls) == len(inference) + len(management)
    # Fixed-length digests on both sides: the comparison never sees the raw (variable-length) token.
    assert set(counter.calls) == {(32, 32)}


def test_no_match_and_wrong_api_compare_the_same_number_of_tokens():
    counter = CountingCompare()
    auth = TokenAuth(["inf-0", "inf-1"], ["mgmt-0"], compare=counter)
    for header in ("Bearer nope", "Bearer mgmt-0", "Bearer inf-1"):
        counter.calls.clear()
        try:
            auth.check("inference", header)
        except (Unauthenticated, PermissionDenied):
            pass
        assert len(counter.calls) == 3


def test_a_long_token_sharing_a_prefix_is_compared_as_a_digest():
    """What a naive `==` leaks (time growing with the shared prefix) cannot happen: whatever the
    presented token's length or prefix, the comparator only ever sees two 32-byte digests. Checked
    by structure, not by timing (a timed test is noise on a shared CI machine)."""
    secret = "s" * 65536
    counter = CountingCompare()
    auth = TokenAuth([secret], compare=counter)
    for presented in (secret[:-1] + "x", "x" + secret[1:], secret[:7], secret + "s"):
        with pytest.raises(Unauthenticated):
            auth.check("inference", f"Bearer {presented}")
    auth.check("inference", f"Bearer {secret}")
    assert counter.calls == [(32, 32)] * 5
