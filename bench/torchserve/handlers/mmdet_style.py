"""TorchServe handler entry point for the mmdet_style comparison; the logic is in service/bench/ts_handlers.py."""
from service.bench.ts_handlers import MMDetStyleHandler

_service = MMDetStyleHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
