from service.observability import metrics


def _count(model: str, protocol: str, code: str) -> float:
    value = metrics.REGISTRY.get_sample_value("detserve_requests_total", {"model": model, "protocol": protocol, "code": code})
    return value or 0.0


def test_not_found_requests_share_one_label_whatever_the_door():
    before = _count(metrics.UNKNOWN_MODEL, "rest", "404"), _count(metrics.UNKNOWN_MODEL, "grpc", "NOT_FOUND")
    metrics.record_request("client-chosen-name-1", "rest", 404, 0.001)
    metrics.record_request("client-chosen-name-2", "grpc", "NOT_FOUND", 0.001)
    assert _count(metrics.UNKNOWN_MODEL, "rest", "404") == before[0] + 1
    assert _count(metrics.UNKNOWN_MODEL, "grpc", "NOT_FOUND") == before[1] + 1
    assert _count("client-chosen-name-1", "rest", "404") == 0


def test_other_codes_keep_the_model_label():
    before = _count("rtmdet", "rest", "200")
    metrics.record_request("rtmdet", "rest", 200, 0.01)
    assert _count("rtmdet", "rest", "200") == before + 1
