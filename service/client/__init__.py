"""Python client for detserve over REST or gRPC: `DetserveClient` (sync), `AsyncDetserveClient`."""
from .client import AsyncDetserveClient, DetserveClient

__all__ = ["AsyncDetserveClient", "DetserveClient"]
