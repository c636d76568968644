"""HTTP for the ticketing APIs: one httpx client per backend, TLS always verified, errors classified.

Every failure that means "the API did not answer usefully" becomes `Unreachable` (decide offline,
retry later); a definite refusal stays an HTTP status for the backend to map. Messages never carry
the request URL, because some APIs put the ticket code in the path.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import certifi
import httpx

from gated import __version__
from gated.config import Config
from gated.errors import ConfigError, Unreachable
from gated.policy.base import Backend, UploadResult
from gated.secrets import read_secret
from gated.store import Store, StoreThread
from gated.tokens import redact

log = logging.getLogger(__name__)

USER_AGENT = f"gated/{__version__}"


@functools.cache
def _tls_context(ca_file: str) -> ssl.SSLContext:
    """Loading the CA bundle costs ~40 ms: do it once per bundle, not per client."""
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return ssl.create_default_context(cafile=certifi.where())


def make_client(config: Config, **kwargs: Any) -> httpx.AsyncClient:
    """An AsyncClient for `[backend] url`: verification on (plus `ca_file` if set), bounded timeouts."""
    ca = _tls_context(config.backend.ca_file)
    timeout = httpx.Timeout(config.backend.timeout_seconds, connect=config.backend.timeout_seconds)
    headers = {"User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
    return httpx.AsyncClient(base_url=config.backend.url, verify=ca, timeout=timeout, headers=headers,
                             limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=30),
                             **kwargs)


async def request(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Send a request; raise Unreachable for network trouble and 5xx, return any other response."""
    try:
        response = await client.request(method, path, **kwargs)
    except (httpx.ConnectTimeout, httpx.PoolTimeout):
        raise Unreachable("timeout before a connection was made", unsent=True) from None
    except httpx.TimeoutException:
        raise Unreachable("timeout") from None
    except httpx.ConnectError as e:  # refused, DNS, TLS handshake: nothing was sent
        raise Unreachable(f"cannot connect: {_reason(e)}", unsent=True) from None
    except httpx.TransportError as e:  # reset, protocol error, TLS failure, DNS failure
        raise Unreachable(f"{type(e).__name__}: {_reason(e)}") from None
    if response.status_code >= 500:
        raise Unreachable(f"HTTP {response.status_code}")
    return response


def json_body(response: httpx.Response) -> Any:
    """The JSON body, or Unreachable: an HTML error page or truncated JSON is not an answer."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        kind = response.headers.get("content-type", "no content type")
        raise Unreachable(f"HTTP {response.status_code} with a body that is not JSON ({kind})") from None


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    # httpx puts the URL in some messages; keep only the OS-level reason.
    return text.split(" for url ")[0][:200]


class HttpBackend(Backend):
    """A Backend that talks HTTP: one lazily made client (made on first use, inside the event loop), closed once."""

    _client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = make_client(self.config)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def replay(self, rows: list[dict[str, Any]], replayable: Callable[[dict[str, Any]], bool],
                     send: Callable[[dict[str, Any]], Awaitable[str | None]]) -> UploadResult:
        """Upload by replaying each offline scan, one request each, for APIs without a batch upload.

        `send(row)` returns None when the server now counts the scan, or why it never will (parked);
        it raises Unreachable when the API did not answer: on the first row that fails the round
        (the Uploader backs off), later rows are kept for the next round, what was sent stays sent.
        Rows that need no replay (denies, nobody passed) count as done.
        """
        result = UploadResult()
        for i, row in enumerate(rows):
            if not replayable(row):
                result.sent.append(row["nonce"])
                continue
            await self.quiet.gap()
            try:
                why = await send(row)
            except Unreachable as e:
                if i == 0:
                    raise
                result.retry.update({r["nonce"]: str(e) for r in rows[i:]})
                return result
            if why is None:
                result.sent.append(row["nonce"])
            else:
                result.parked[row["nonce"]] = f"{redact(row['token'])}: {why}"
        return result

    async def _credential(self, store: StoreThread | None, file: str, where: str, kv_key: str) -> str | None:
        """The device credential: from its secret file when configured, else as `gated pair` stored it."""
        if file:
            try:
                return read_secret(file, where)
            except ConfigError as e:  # logged, not raised: the gate still decides offline
                log.error("%s", "; ".join(e.problems), extra={"GATED_EVENT": "config_problem"})
                return None
        return await store.call(Store.get, kv_key) if store is not None else None
