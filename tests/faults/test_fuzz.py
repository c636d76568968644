"""Bad input, generated: every decoder and parser gated runs on what the outside world sends.

Hypothesis drives each one; the property is always the same shape: no unhandled exception, and
every outcome is one gated knows what to do with (a DENY with a Reason, an `Unreachable` that
sends the gate offline, a `ConfigError` that names the key). Nothing garbled is ever admitted.

Already fuzzed elsewhere, not repeated here: scanner keystrokes (tests/drivers/test_keymap.py),
serial framing and decoding (tests/drivers/test_framing.py), pretix_sig1 payload round trips
(tests/policy/test_signatures.py).

The values are hostile, not merely random: text over every code point including lone surrogates,
integers far outside SQLite's range, `nan` and infinities, nesting thousands deep, wrong types.

Default: a hundred cases per target so the file runs in seconds. `--long` raises each target to
LONG_EXAMPLES, over 100,000 cases in all; the count each target actually ran is reported at the end
of the run (`fuzz_cases[target]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import gated_faults_backends as backends  # tests/faults/backends.py, registered by conftest.py
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gated import config as configmod
from gated.daemon import build
from gated.drivers.tlv import CodecError, ndef_message, ndef_parse, tlv, tlv_parse
from gated.errors import ConfigError, GatedError, Unreachable
from gated.model import Decision, Reason, Scan, ScanMode, Source, Verdict
from gated.policy import wallet
from gated.policy.base import UploadResult
from gated.policy.http import make_client
from gated.policy.pretix_sig1 import decode_ticket, load_sig1_keys, verify_sig1
from gated.policy.signatures import verify_tibillet
from gated.simulators.pretix import make_sig1_secret, sig1_public_key
from gated.simulators.tibillet import make_code
from gated.tokens import Malformed, normalise

SHORT_EXAMPLES = 100
LONG_EXAMPLES = 4000


@pytest.fixture
def fuzz(request, figures):
    """fuzz(strategy, check): run check on `examples` drawn values; counts the cases run."""
    examples = LONG_EXAMPLES if request.config.getoption("--long") else SHORT_EXAMPLES

    def run(strategy: st.SearchStrategy, check: Callable[[Any], None]) -> None:
        count = [0]

        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def property_holds(value):
            count[0] += 1
            check(value)

        property_holds()
        figures[f"fuzz_cases[{request.node.name}]"].append(count[0])

    return run


# --- generic JSON -------------------------------------------------------------------------------

# Every code point, lone surrogates included (what a decoder with surrogateescape or a JSON "\udcff" gives).
ANY_CHAR = st.characters(exclude_categories=())
HOSTILE_TEXT = st.sampled_from([
    "\udcff", "\ud800x", "\x00", "\x1b[2J", "\u2028", "\x85", "\r", "x" * 5000,
    "Mallory\n19:10:00 lane-1 ADMIT ok online entry front …0001 3ms \"Forged\"",
]) | st.text(ANY_CHAR, max_size=12)
HUGE_INTS = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -(10**400)]) | st.integers()
SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | HUGE_INTS | st.floats() | st.text(max_size=12)
           | HOSTILE_TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)


def mutations(template: Any) -> st.SearchStrategy:
    """Values shaped like `template` with fields dropped, retyped or replaced, plus unrelated JSON."""
    if isinstance(template, dict):
        shaped = st.fixed_dictionaries({}, optional={k: mutations(v) for k, v in template.items()})
        extra = st.dictionaries(st.text(max_size=8), SCALARS, max_size=2)
        mutated = st.builds(lambda a, b: {**b, **a}, shaped, extra)
    elif isinstance(template, list) and template:
        mutated = st.lists(st.one_of(*(mutations(t) for t in template[:2])), max_size=3)
    else:
        mutated = st.just(template)
    return st.one_of(mutated, mutated, JSON)  # mostly near the real shape, sometimes anything


# --- tokens -------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80) | st.text(ANY_CHAR, max_size=80)
AIM = st.sampled_from(["", "]Q1", "]C0", "]E0", "]d2", "]"])


def test_normalise_returns_a_clean_token_or_says_malformed(fuzz):
    def check(args):
        aim, text, prefix, suffix, limit = args
        try:
            token = normalise(aim + text, prefix=prefix, suffix=suffix, max_length=limit)
        except Malformed as e:
            assert str(e)
            return
        assert token and token == token.strip() and len(token) <= limit
        assert not re.search(r"[\x00-\x1f\x7f-\x9f]", token) and "\ufffd" not in token

    fuzz(st.tuples(AIM, TEXT, st.text(max_size=3), st.text(max_size=3), st.integers(1, 100)), check)


# --- configuration ------------------------------------------------------------------------------

SECTIONS = ["lane", "backend", "backend.entry", "backend.pretix", "backend.local", "backend.cm", "reader.front",
            "reader.qr", "gpio", "relay", "led.green", "led.red", "buzzer", "input.passage", "input.emergency",
            "offline", "store", "log", "wallet.apple", "wallet.google", "nosuch", "reader", "led"]
KEYS = sorted({k for schema in (configmod.LANE, configmod.BACKEND, configmod.READER_COMMON, configmod.GPIO,
                                configmod.RELAY, configmod.LED, configmod.PASSAGE, configmod.OFFLINE, configmod.STORE,
                                configmod.LOG, configmod.WALLET_APPLE, configmod.WALLET_GOOGLE)
               for k in schema} | {"api_key_file", "organizer", "tickets", "masks", "port", "device", "nmae"})
TOML_VALUES = st.sampled_from([
    '"entry"', '"local"', '"hid"', '"serial"', '"stdin"', '"mock"', '"lgpio"', "17", "-1", "0", "27", "28", "0.2",
    "1e400", "-0.0", "nan", "inf", "true", "false", '""', '"/"', '"/dev/null"', '"\\u0000"', '"no/such/file"',
    "[]", '["a", 1]', '["CRASH-######"]', "{ a = 1 }", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27",
    '"https://tickets.example.com"', '"ftp://x"', '"2s"', '"500ms"', "'''multi\nline'''", "0x1F", "1_000",
])


@st.composite
def toml_documents(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        choice = draw(st.integers(0, 9))
        if choice < 3:
            lines.append(f"[{draw(st.sampled_from(SECTIONS))}]")
        elif choice < 8:
            lines.append(f"{draw(st.sampled_from(KEYS))} = {draw(TOML_VALUES)}")
        elif choice < 9:
            lines.append(draw(st.text(max_size=30)))  # anything at all on a line
        else:
            lines.append(f"[[{draw(st.sampled_from(SECTIONS))}]]")
    return "\n".join(lines) + "\n"


def test_config_loader_gives_a_config_or_a_config_error_for_any_file(fuzz, tmp_path):
    path = tmp_path / "gated.toml"

    def check(doc):
        data = doc if isinstance(doc, bytes) else doc.encode("utf-8", "surrogatepass")
        path.write_bytes(data)
        try:
            config = configmod.load(str(path))
        except ConfigError as e:
            assert e.problems and all(isinstance(p, str) and p for p in e.problems)
            configmod.report(e)
            return
        configmod.dump(config)
        assert not _non_finite(config), doc

    fuzz(st.one_of(toml_documents(), st.binary(max_size=200)), check)


def _non_finite(value: Any, seen: set[int] | None = None) -> list[float]:
    """Every float inside a loaded config that is nan or infinite (none may pass the checker)."""
    seen = set() if seen is None else seen
    if isinstance(value, float):
        return [] if math.isfinite(value) else [value]
    if id(value) in seen or isinstance(value, (str, bytes, int)) or value is None:
        return []
    seen.add(id(value))
    if isinstance(value, dict):
        return [x for v in value.values() for x in _non_finite(v, seen)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [x for v in value for x in _non_finite(v, seen)]
    if hasattr(value, "__dict__"):
        return _non_finite(vars(value), seen)
    return []


TABLE_VALUES = st.recursive(SCALARS | st.just("/dev/null") | st.just("\x00"),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(KEYS), c, max_size=3),
                            max_leaves=8)


def test_config_checker_gives_a_config_or_a_config_error_for_any_tables(fuzz, tmp_path):
    names = ["lane", "backend", "reader", "gpio", "relay", "led", "buzzer", "input", "offline", "store", "log",
             "wallet", "x"]
    keys = st.sampled_from(KEYS + ["front", "green", "entry", "passage", "apple"])
    tables = st.dictionaries(st.sampled_from(names), st.dictionaries(keys, TABLE_VALUES, max_size=5), max_size=6)

    def check(raw):
        try:
            config = configmod.from_dict(raw, str(tmp_path / "gated.toml"))
        except ConfigError as e:
            assert all(isinstance(p, str) and p for p in e.problems)
            return
        assert not _non_finite(config), raw

    fuzz(tables, check)


# --- signed codes -------------------------------------------------------------------------------

_KEYS: dict[str, Any] = {}


def _rsa() -> rsa.RSAPrivateKey:
    if "rsa" not in _KEYS:
        _KEYS["rsa"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEYS["rsa"]


def _edits(original: str) -> st.SearchStrategy:
    """The original text with a character changed, inserted or removed, or cut short."""
    n = len(original)
    change = st.builds(lambda i, c: original[:i] + c + original[i + 1:], st.integers(0, n - 1), st.characters())
    insert = st.builds(lambda i, c: original[:i] + c + original[i:], st.integers(0, n), st.characters())
    drop = st.builds(lambda i: original[:i] + original[i + 1:], st.integers(0, n - 1))
    cut = st.builds(lambda i: original[:i], st.integers(0, n))
    return st.one_of(change, insert, drop, cut)


def test_tibillet_codes_altered_anyhow_are_never_admitted_for_another_ticket(fuzz):
    key = _rsa()
    uuid = "6f1c2a52-7d2e-4a57-9a0e-1b2c3d4e5f60"
    code = make_code(key, uuid)

    def check(text):
        result = verify_tibillet(text, [key.public_key()])
        assert isinstance(result.reason, Reason)
        if result.reason is Reason.OK:
            assert result.uuid == uuid  # another spelling of the same signed text, at most

    fuzz(st.one_of(_edits(code), TEXT), check)


def test_pretix_signed_secrets_altered_anyhow_are_never_admitted_as_another_ticket(fuzz):
    key = ed25519.Ed25519PrivateKey.generate()
    keys = load_sig1_keys([sig1_public_key(key)])
    secret = make_sig1_secret(key, 7, 0, 0, valid_from=1_700_000_000, valid_until=None)
    ticket = verify_sig1(secret, keys).ticket

    def check(text):
        result = verify_sig1(text, keys)
        assert isinstance(result.reason, Reason)
        if result.reason is Reason.OK:
            assert result.ticket == ticket

    fuzz(st.one_of(_edits(secret), TEXT), check)


def test_pretix_ticket_payload_decoder_returns_a_ticket_or_value_error(fuzz):
    def check(payload):
        try:
            ticket = decode_ticket(payload)
        except ValueError:
            return
        assert isinstance(ticket.item, int) and isinstance(ticket.seed, str)

    fuzz(st.binary(max_size=64), check)


# --- NFC: BER-TLV, NDEF and whole wallet taps -----------------------------------------------------


def test_tlv_parser_returns_objects_that_fit_the_input_or_codec_error(fuzz):
    def check(data):
        try:
            items = tlv_parse(data)
        except CodecError:
            return
        assert sum(len(t.value) for t in items) <= len(data)
        for t in items:
            if t.constructed:
                try:
                    tlv_parse(t.value)
                except CodecError:
                    pass

    nested = st.builds(lambda tag, v: tlv(tag, v), st.sampled_from([0x6F, 0x50, 0x9F27, 0xA5, 0xBF0C, 0x1F]),
                       st.binary(max_size=40))
    fuzz(st.one_of(st.binary(max_size=80), nested, st.builds(bytes.__add__, nested, st.binary(max_size=8))), check)


def test_ndef_parser_returns_records_or_codec_error(fuzz):
    def check(data):
        try:
            records = ndef_parse(data)
        except CodecError:
            return
        assert all(isinstance(r.name, str) and isinstance(r.payload, bytes) for r in records)

    valid = st.builds(lambda name, payload: ndef_message((name, payload)), st.sampled_from(["ses", "n", "cpl", "x"]),
                      st.binary(max_size=30))
    flipped = st.builds(lambda m, i, b: m[:i % max(1, len(m))] + bytes([b]) + m[i % max(1, len(m)) + 1:], valid,
                        st.integers(0, 200), st.integers(0, 255))
    fuzz(st.one_of(st.binary(max_size=80), valid, flipped), check)


class LinkLost(Exception):
    """The phone left the field: what the NFC driver's transceive raises; read_wallet lets it through."""


def test_a_wallet_tap_with_any_card_answers_ends_in_an_outcome_never_a_crash(fuzz):
    apple_key = ec.generate_private_key(ec.SECP256R1())
    kid = wallet.apple_key_id(apple_key)
    keys = wallet.WalletKeys(
        apple={kid: wallet.AppleKey(kid, apple_key, frozenset({"pass.com.example"}), "fuzz")},
        pass_type_ids=("pass.com.example",),
        google=(wallet.GoogleKey(20180608, 1, ec.generate_private_key(ec.SECP256R1()), "fuzz"),))
    sw = st.sampled_from([b"\x90\x00", b"\x6a\x83", b"\x62\x87", b"\x69\x84", b"\x90\x01", b"\x93\x00", b"\x95\x00",
                          b"\x6d\x00"])
    labels = st.sampled_from([b"ApplePay", b"AndroidPay", b"OSE.VAS.01", b""])
    select = st.builds(lambda label, rest, s: tlv(0x6F, tlv(0x50, label) + rest) + s, labels, st.binary(max_size=20),
                       sw)
    answer = st.one_of(st.binary(max_size=60), st.builds(bytes.__add__, st.binary(max_size=60), sw), select)

    def check(answers):
        queue = list(answers)

        def transceive(command: bytes) -> bytes:
            if not queue:
                raise LinkLost
            return queue.pop(0)

        try:
            read = wallet.read_wallet(transceive, keys)
        except LinkLost:
            return
        assert isinstance(read.outcome, wallet.Outcome)
        assert read.outcome is not wallet.Outcome.OK or read.value is not None

    fuzz(st.lists(answer, min_size=1, max_size=6), check)


# --- API responses, per backend ------------------------------------------------------------------

# What each backend asks for, as a regex on the request path, and how an admission looks in its answer.
TARGETS = {
    "entry": {"validate": r"/scan/validate$", "upload": r"/offline/", "probe": r"/ping$", "sync": r"/events$"},
    "tibillet": {"validate": r"/(check_)?ticket/$", "upload": r"/(check_)?ticket/$", "probe": r"/check_api_scan/$",
                 "sync": r"/list_tickets/$"},
    "pretix": {"validate": r"/checkinrpc/redeem/$", "upload": r"/checkinrpc/redeem/$", "probe": r"/events/democon/$",
               "sync": r"/events/democon/"},
    "pretixdroid": {"validate": r"/redeem/$", "upload": r"/redeem/$", "probe": r"/status/$", "sync": r"^$"},
    "cm": {"validate": r"/barcodes/checkin$", "upload": r"/barcodes/upload$", "probe": r"/services$",
           "sync": r"/barcodes$"},
}


def admitted_by(backend: str, status: int, body: Any) -> bool:
    """Whether an answer says "admit" in that API's own words (what a correct parser may admit on)."""
    if not 200 <= status < 300 or not isinstance(body, dict):
        return False
    if backend == "entry":
        return body.get("status") == "Admit"
    if backend == "tibillet":
        return body.get("success") is True
    if backend in ("pretix", "pretixdroid"):
        return body.get("status") == "ok"
    from gated.policy.cm import ADMIT_CODES, REASONS

    barcodes = body.get("barcodes")
    first = barcodes[0] if isinstance(barcodes, list) and barcodes and isinstance(barcodes[0], dict) else {}
    message = first.get("scan_status_message")
    try:
        code = int(first.get("scan_status_code"))
    except (TypeError, ValueError):
        return False
    return code in ADMIT_CODES or code not in REASONS and isinstance(message, str) and message.startswith("ADMIT")


class ScriptedApi:
    """An httpx transport: requests to the target path get the drawn answers; the rest reach the simulator.

    With `repeat`, the last drawn answer also answers every later request to the target (an upload
    of several scans, a retry after 401): a property about the answer then holds for all of them.
    """

    def __init__(self) -> None:
        self.forward = httpx.AsyncHTTPTransport()
        self.target = re.compile("^$")
        self.answers: list[tuple[int, bytes, str]] = []
        self.repeat = True
        self.recording: list[bytes] | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.target.search(request.url.path):
            if self.answers:
                status, body, kind = self.answers[0] if len(self.answers) == 1 and self.repeat else self.answers.pop(0)
                return httpx.Response(status, content=body, headers={"Content-Type": kind})
            if self.recording is not None:
                response = await self.forward.handle_async_request(request)
                body = await response.aread()
                self.recording.append(body)
                return httpx.Response(response.status_code, headers=response.headers, content=body)
        return await self.forward.handle_async_request(request)


def _answer(templates: list[bytes]) -> st.SearchStrategy:
    shapes = [mutations(json.loads(t)) for t in templates if _is_json(t)] or [JSON]
    json_body = st.one_of(*shapes).map(lambda v: json.dumps(v).encode())
    real = st.sampled_from(templates or [b"{}"])
    raw = st.one_of(real, real.flatmap(lambda t: st.integers(0, len(t)).map(lambda n: t[:n])),
                    st.binary(max_size=40), st.sampled_from(HOSTILE_BODIES))
    status = st.one_of(st.sampled_from([200, 201, 400, 401, 403, 404, 409, 429, 500, 502, 503]), st.integers(200, 599))
    kind = st.sampled_from(["application/json", "text/json", "text/html"])
    return st.tuples(status, st.one_of(json_body, json_body, raw), kind)


HOSTILE_BODIES = [
    b"<html><body>Welcome to Venue Wi-Fi</body></html>",
    b"[" * 10_000 + b"]" * 10_000,
    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    b"1" * 5_000,
    b'{"status": NaN, "eventId": Infinity}',
    b'{"status":"Stop","status":"Admit","success":false,"success":true}',
    b'"\\udcff"', b"null", b"[]", b'"ok"', b"\xff\xfe{}",
]


def _is_json(data: bytes) -> bool:
    return _parse(data) is not None


def _parse(body: bytes) -> Any:
    """The body as the most lenient reader would see it (None when even that fails)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


@pytest.fixture
def api_gate(make_kit, load_config):
    """A paired, synced gate for one backend whose HTTP client goes through a ScriptedApi."""
    made = []

    def make(backend: str):
        kit = make_kit(backend, n_tokens=2)
        cfg = load_config(kit.toml(kit.sim.url))
        cfg.lane["debounce_seconds"] = 0.0
        api = ScriptedApi()
        loop = asyncio.new_event_loop()
        parts = loop.run_until_complete(build(cfg))
        made.append((loop, parts))
        loop.run_until_complete(kit.prepare(parts))
        transport = httpx.MockTransport(api)
        b = parts.backend
        if backend == "entry":
            loop.run_until_complete(b.client.aclose())
            b.client = make_client(cfg, transport=transport)
        else:
            if b._client is not None:
                loop.run_until_complete(b._client.aclose())
            headers = {"X-DEVICE-INFO": b.device_info, "Content-Type": "application/json",
                       "Accept": "application/json"} if backend == "cm" else {}
            b._client = make_client(cfg, transport=transport, headers=headers)
        return kit, cfg, api, loop, parts

    yield make
    for loop, parts in made:
        loop.run_until_complete(parts.close())
        loop.close()


async def _queued_rows(parts, kit) -> list[dict[str, Any]]:
    """Rows as the uploader hands them over: admitted offline entries of the kit's tickets."""
    parts.decider.offline_first = True
    for token in kit.tokens:
        await parts.gate.handle(Scan(token=token, reader="front"))
    parts.decider.offline_first = False
    return await parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans WHERE upload = 'pending'")))


OPERATIONS = ["validate", "upload", "probe", "sync"]


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("backend", backends.available_backends())
def test_any_api_answer_is_a_verdict_an_upload_outcome_or_unreachable_never_a_crash(backend, operation, api_gate,
                                                                                     fuzz):
    kit, cfg, api, loop, parts = api_gate(backend)
    b = parts.backend
    api.target = re.compile(TARGETS[backend][operation])
    rows = loop.run_until_complete(_queued_rows(parts, kit)) if operation == "upload" else []
    nonces = {r["nonce"] for r in rows}

    async def call():
        if operation == "validate":
            return await b.validate(Scan(token=kit.tokens[0], reader="front"), ScanMode.ENTRY)
        if operation == "upload":
            return await b.upload(rows)
        if operation == "probe":
            return await b.probe()
        return await b.sync(parts.store)

    # The real answers of this API, to mutate from: one round through to the simulator.
    api.recording = []
    try:
        loop.run_until_complete(call())
    except GatedError:
        pass
    templates, api.recording = api.recording, None
    if operation == "sync" and TARGETS[backend]["sync"] == "^$":
        pytest.skip(f"the {backend} backend downloads nothing")

    api.repeat = operation != "sync"  # a sync's later requests (pages, other lists) reach the simulator

    def offline_verdict() -> tuple[Verdict, Reason]:
        d = loop.run_until_complete(parts.store.call(
            lambda s: b.decide_offline(s, Scan(token=kit.tokens[-1], reader="front"), ScanMode.ENTRY, time.time(),
                                       True)))
        return d.verdict, d.reason

    def check(drawn):
        before = offline_verdict() if operation == "sync" else None
        api.answers = list(drawn)
        try:
            result = loop.run_until_complete(call())
        except Unreachable:
            failed = True
        except GatedError:
            # A definite refusal (BackendRejected, ConfigError): allowed where the caller handles it.
            assert operation in ("upload", "sync"), f"{operation} may only raise Unreachable"
            failed = True
        else:
            failed = False
        if operation == "sync" and failed:
            # A failed sync keeps what the gate had: the same ticket is decided offline as before it.
            assert offline_verdict() == before, drawn
        if failed:
            return
        status, body = drawn[0][0], _parse(drawn[0][1])
        if operation == "validate":
            assert isinstance(result, Decision) and result.source is Source.ONLINE
            assert isinstance(result.reason, Reason) and isinstance(result.verdict, Verdict)
            if result.admitted:
                assert admitted_by(backend, status, body), (status, drawn[0][1])
        elif operation == "probe":
            # Only the API itself answering closes the breaker: a portal's page or an error is no proof.
            assert 200 <= status < 300, (status, drawn[0][1])
        elif operation == "sync":
            assert result is None
        elif operation == "upload":
            assert isinstance(result, UploadResult)
            sent, parked, retry = set(result.sent), set(result.parked), set(result.retry)
            assert sent | parked | retry <= nonces and not (sent & parked or sent & retry or parked & retry)
            if sent:  # only an answer from the API itself can confirm an upload
                assert status < 500 and body is not None, (status, drawn[0][1])

    fuzz(st.lists(_answer(templates), min_size=1, max_size=4 if operation == "sync" else 1), check)


# --- the whole scan path: reader text -> normalise -> decide -> store -> outputs -> log ----------------

# What readers hand over: any text (a serial engine decodes with surrogateescape, so invalid bytes
# arrive as lone surrogates), a real ticket with junk around it, or a real ticket as it is.
def _reader_text(tokens: list[str]) -> st.SearchStrategy:
    real = st.sampled_from(tokens)
    wrapped = st.builds(lambda a, t, b: a + t + b, st.text(ANY_CHAR, max_size=3), real, st.text(ANY_CHAR, max_size=3))
    decoded = st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape"))
    return st.one_of(real, wrapped, decoded, st.text(ANY_CHAR, max_size=80), HOSTILE_TEXT)


class _Lines(logging.Handler):
    """What a technician would read on the terminal: the scan logger through gated's own formatter."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        from gated.logs import PlainFormatter

        self.setFormatter(PlainFormatter())
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))


SCAN_LINE = re.compile(r"^\d\d:\d\d:\d\d lane-1 (ADMIT|DENY) [a-z_]+ (online|offline|mode) \S+ \S+ …\S* \d+ms")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@pytest.mark.parametrize("backend", backends.available_backends())
def test_any_reader_text_and_api_answer_give_one_recorded_scan_and_one_true_log_line(backend, api_gate, fuzz):
    kit, cfg, api, loop, parts = api_gate(backend)
    api.target = re.compile(TARGETS[backend]["validate"])
    api.recording = []
    loop.run_until_complete(parts.backend.validate(Scan(token=kit.tokens[0], reader="front"), ScanMode.ENTRY))
    templates, api.recording = api.recording, None
    lines = _Lines()
    scan_log = logging.getLogger("gated.scan")
    scan_log.addHandler(lines)
    scan_log.setLevel(logging.INFO)

    def check(drawn):
        text, answer = drawn
        api.answers = [answer]
        parts.decider.breaker.close()  # every case asks the API, however the last one ended
        lines.text.clear()
        scan = Scan(token=text, reader="front")
        decision = loop.run_until_complete(parts.gate.handle(scan))
        assert isinstance(decision, Decision) and isinstance(decision.reason, Reason)
        recorded = loop.run_until_complete(parts.store.call(
            lambda s: s.db.execute("SELECT count(*) FROM scans WHERE nonce = ?", [scan.nonce]).fetchone()[0]))
        assert recorded == 1
        out = "\n".join(lines.text).split("\n")
        assert len(out) == 1 and SCAN_LINE.match(out[0]), out
        assert not CONTROL.search(out[0]), out[0]
        if decision.admitted and decision.source is Source.ONLINE:
            assert admitted_by(backend, answer[0], _parse(answer[1])), answer
        if decision.admitted and decision.source is Source.OFFLINE and decision.reason is not Reason.FALLBACK_ADMIT:
            assert any(t in text for t in kit.tokens), text

    try:
        fuzz(st.tuples(_reader_text(kit.tokens), _answer(templates)), check)
    finally:
        scan_log.removeHandler(lines)
