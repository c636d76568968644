"""HTTP for the ticketing APIs: one httpx client per backend, TLS always verified, errors classified.

Every failure that means "the API did not answer usefully" becomes `Unreachable` (decide offline,
retry later); a definite refusal stays an HTTP status for the backend to map. Messages never carry
the request URL, because some APIs put the ticket code in the path.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import certifi
import httpx

from gated import __version__
from gated.config import Config
from gated.errors import BackendRejected, ConfigError, Unreachable
from gated.policy.answer import ID_LIMIT, LONE_SURROGATE, cut
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


# How much of an answer is read. A scan's answer is a few hundred bytes; 64 kB leaves room for a
# verbose server and still cannot cost the scan path memory or time. A page of a list (CM.com's
# 500 barcodes are 300-400 kB, Entry's events with masks and NFC keys, pretix's revoked secrets)
# gets a few MB. Anything bigger is not an answer in the API's shape: the call fails (offline).
SCAN_ANSWER_LIMIT = 64 * 1024
LIST_PAGE_LIMIT = 4 * 1024 * 1024
# A JSON body larger than this is parsed on a worker thread (`json_answer`), so a big list page
# never holds up a scan on the event loop.
PARSE_ON_LOOP_LIMIT = 64 * 1024
# A compressed answer is fed to httpx's decoder in slices this big: deflate expands at most ~1000
# times, so one step yields at most ~1 MB before the size limit is checked again (a gzip bomb is
# refused while it unpacks, not after).
_COMPRESSED_SLICE = 1024


class _Sliced(httpx.AsyncByteStream):
    """A response stream handed on in small slices, so each decompression step stays small."""

    def __init__(self, stream: httpx.AsyncByteStream, size: int):
        self._stream = stream
        self._size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            for i in range(0, len(chunk), self._size):
                yield chunk[i:i + self._size]

    async def aclose(self) -> None:
        await self._stream.aclose()


def call_deadline(client: httpx.AsyncClient, timeout: Any = None) -> float:
    """The whole exchange's time limit: the connect timeout plus one read timeout for the entire answer.

    httpx's timeouts count per read, so a server that trickles a byte at a time would never trip
    them; this limit holds from the first byte sent to the last byte read.
    """
    t = client.timeout if timeout is None else httpx.Timeout(timeout)
    return (t.connect or 0.0) + (t.read if t.read is not None else 60.0)


async def request(client: httpx.AsyncClient, method: str, path: str, *, limit: int = SCAN_ANSWER_LIMIT,
                  deadline: float | None = None, **kwargs: Any) -> httpx.Response:
    """Send a request; raise Unreachable for network trouble, 5xx and answers that are too big or too slow.

    The answer is read whole (decompressed, at most `limit` bytes) within `deadline` seconds
    (default: `call_deadline`); the returned Response holds that body. Any other status is
    returned for the backend to judge by its body's shape.
    """
    seconds = deadline if deadline is not None else call_deadline(client, kwargs.get("timeout"))
    try:
        async with asyncio.timeout(seconds):
            async with client.stream(method, path, **kwargs) as response:
                if response.status_code >= 500:
                    raise Unreachable(f"HTTP {response.status_code}")
                body = await _read(response, limit)
    except TimeoutError:
        raise Unreachable(f"no complete answer within {seconds:g}s") from None
    except (httpx.ConnectTimeout, httpx.PoolTimeout):
        raise Unreachable("timeout before a connection was made", unsent=True) from None
    except httpx.TimeoutException:
        raise Unreachable("timeout") from None
    except httpx.ConnectError as e:  # refused, DNS, TLS handshake: nothing was sent
        raise Unreachable(f"cannot connect: {_reason(e)}", unsent=True) from None
    except httpx.TransportError as e:  # reset, protocol error, TLS failure, DNS failure
        raise Unreachable(f"{type(e).__name__}: {_reason(e)}") from None
    except httpx.DecodingError as e:  # a body that does not decompress
        raise Unreachable(f"HTTP {response.status_code} with a body that does not decode: {_reason(e)}") from None
    # The body is already decoded: the copy carries no Content-Encoding, so httpx does not decode it again.
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=body, request=response.request,
                          extensions=response.extensions)


async def _read(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, or Unreachable as soon as it grows past `limit` (never read whole first)."""
    declared = response.headers.get("content-length", "")
    too_big = f"HTTP {response.status_code} with an answer over {limit // 1024} kB; not read"
    if not response.headers.get("content-encoding") and declared.isdigit() and int(declared) > limit:
        raise Unreachable(too_big)
    if response.headers.get("content-encoding"):
        response.stream = _Sliced(response.stream, _COMPRESSED_SLICE)
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise Unreachable(too_big)
        parts.append(chunk)
    return b"".join(parts)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"status": "Stop", "status": "Admit"} is no API's answer: json would keep the last one.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_float=_finite, parse_constant=_no_constant)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(content: bytes, what: str = "answer") -> Any:
    """Strict JSON from outside, or Unreachable: UTF-8, no duplicate keys, no NaN, finite numbers.

    Nesting deeper than Python's recursion limit and integers of more than 4,300 digits fail too
    (json raises RecursionError and ValueError for them). A lone surrogate escape ("\\udcff") cannot
    be stored or printed: it becomes U+FFFD, so one odd name does not cost a whole list.
    """
    try:
        value = _DECODER.decode(content.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise Unreachable(f"{what} is not JSON as the API sends it ({type(e).__name__})") from None
    if _SURROGATE_ESCAPE.search(content):
        value = _without_surrogates(value)
    return value


def _without_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (keys too) replaced; iterative, as nesting may be deep."""
    def clean(item: Any) -> Any:
        return LONE_SURROGATE.sub("\ufffd", item) if isinstance(item, str) else item

    root = [value]
    stack: list[list | dict] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, item in enumerate(node):
                node[i] = clean(item)
                if isinstance(item, (list, dict)):
                    stack.append(item)
        else:
            for key in list(node):
                item = node.pop(key)
                node[clean(key)] = clean(item)
                if isinstance(item, (list, dict)):
                    stack.append(item)
    return root[0]


def json_body(response: httpx.Response) -> Any:
    """The JSON body, or Unreachable: an HTML error page or truncated JSON is not an answer.

    Parses on the event loop: for answers read with the default limit (64 kB). Larger ones go
    through `json_answer`.
    """
    return parse_json(response.content, f"HTTP {response.status_code} ({_kind(response)})")


async def json_answer(response: httpx.Response) -> Any:
    """`json_body`, on a worker thread when the body is large (a list page), so scans are not held up."""
    if len(response.content) <= PARSE_ON_LOOP_LIMIT:
        return json_body(response)
    return await asyncio.to_thread(json_body, response)


def api_message(response: httpx.Response, pick: Callable[[Any], str | None], body: Any = None) -> str | None:
    """The API's own words in an answer: what `pick` finds in the JSON body (the API's error shape),
    cut for a log line; None when the body is not JSON or not that shape.

    `body` is the JSON body when the caller has parsed it already: a list page is parsed once, off
    the event loop, not again here. (A body that is JSON null is parsed again: it is four bytes.)
    `pick` leaves out what must not reach a log, such as a ticket secret the API echoes.
    """
    try:
        said = pick(parse_json(response.content) if body is None else body)
    except Unreachable:
        return None
    return cut(said) if isinstance(said, str) and said else None


def error_text(response: httpx.Response, pick: Callable[[Any], str | None], body: Any = None) -> str:
    """Why a call was refused, for a log or queue line: the API's own words (`api_message`), else the
    HTTP reason phrase. Never the raw body: an error page may echo the ticket code from the path."""
    return api_message(response, pick, body) or response.reason_phrase or f"HTTP {response.status_code}"


def pairing_answer(response: httpx.Response, field: str, pick: Callable[[Any], str | None], *,
                   not_json: str, refused: str, fix: str) -> tuple[dict[str, Any], str]:
    """The answer to a pairing request (`gated pair`) and the credential in its `field`, or BackendRejected.

    A refusal is the installer's to act on, so `gated pair` prints it and exits 2: `not_json` when
    the answer is not JSON (no such API at [backend] url); else, when it holds no credential,
    "`refused` (HTTP status: the API's words); `fix`", the words found by `pick` (`api_message`).
    """
    try:
        body = json_body(response)
    except Unreachable:
        raise BackendRejected(not_json) from None
    answer = body if isinstance(body, dict) else {}
    credential = answer.get(field)
    if response.status_code != 200 or not isinstance(credential, str) or not credential or len(credential) > ID_LIMIT:
        why = api_message(response, pick, body)
        raise BackendRejected(f"{refused} (HTTP {response.status_code}{': ' + why if why else ''}); {fix}")
    return answer, credential


def _kind(response: httpx.Response) -> str:
    return response.headers.get("content-type", "no content type")[:60]


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

    async def _keep_pairing(self, store: StoreThread, kept: dict[str, str], credential: str) -> str:
        """Store what `gated pair` obtained (the credential and what it names) in the owner-only store;
        the line that tells the installer where it went (never the credential itself)."""
        for key, value in kept.items():
            await store.call(Store.set, key, value)
        return f"{credential} stored in {store.store.path} (owner-only)"

    async def _credential(self, store: StoreThread | None, file: str, where: str, kv_key: str) -> str | None:
        """The device credential: from its secret file when configured, else as `gated pair` stored it."""
        if file:
            try:
                return read_secret(file, where)
            except ConfigError as e:  # logged, not raised: the gate still decides offline
                log.error("%s", "; ".join(e.problems), extra={"GATED_EVENT": "config_problem"})
                return None
        return await store.call(Store.get, kv_key) if store is not None else None
