"""The Azure Service Bus backend: the real asyncio SDK, bridged with trio-asyncio.

This is the only module that imports asyncio, trio_asyncio or azure.servicebus.

Status: the bridge itself is tracked by the "Azure backend" issue and is not written
yet; constructing the class works (so configuration can be checked), entering it raises
`NotImplementedError` naming that issue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["AzureServiceBus"]


class AzureServiceBus:
    """Azure Service Bus through the ``azure-servicebus`` asyncio SDK (not implemented yet)."""

    def __init__(self, fully_qualified_namespace: str, credential: object, **client_kwargs: Any):
        if not isinstance(fully_qualified_namespace, str) or not fully_qualified_namespace:
            raise ValueError(
                "fully_qualified_namespace must be a host name such as "
                "'<namespace>.servicebus.windows.net'"
            )
        self._namespace = fully_qualified_namespace
        self._credential = credential
        self._client_kwargs = client_kwargs
        self._conn_str: str | None = None

    @classmethod
    def from_connection_string(cls, conn_str: str, **client_kwargs: Any) -> AzureServiceBus:
        """Build from a ``Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...`` string."""
        parts = dict(part.split("=", 1) for part in conn_str.split(";") if "=" in part)
        endpoint = parts.get("Endpoint")
        if not endpoint:
            raise ValueError("the connection string has no Endpoint=sb://<host>/ part")
        host = endpoint.split("://", 1)[-1].strip("/")
        self = cls(host, None, **client_kwargs)
        self._conn_str = conn_str
        return self

    async def __aenter__(self) -> AzureServiceBus:
        raise NotImplementedError(
            "the Azure Service Bus backend is not implemented yet (see the 'Azure backend' "
            "issue); use MemoryBroker meanwhile"
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
