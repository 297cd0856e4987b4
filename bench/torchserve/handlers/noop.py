"""TorchServe handler entry point for the noop comparison; the logic is in service/bench/ts_handlers.py."""
from service.bench.ts_handlers import NoopHandler

_service = NoopHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
