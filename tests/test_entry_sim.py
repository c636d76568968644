"""The Entry simulator refuses what the real API refuses: bare HTTP against it, no gated code in between."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import httpx
import pytest

from gated.simulators.entry import DEFAULT_API_KEY, EntrySimulator, jwt_decode, jwt_encode, main, read_tickets

KEY = {"API-Authorization-Key": DEFAULT_API_KEY}
SESSION = {"venueCode": "TS", "dataAccountId": "390", "serialNumber": "S1", "make": "M", "model": "X"}
EVENT = "390:SIM:EVT1"


@pytest.fixture
def sim():
    s = EntrySimulator().start()
    yield s
    s.stop()


@pytest.fixture
def http(sim):
    with httpx.Client(base_url=sim.url) as client:
        yield client


def bearer(http, path="/session", body=SESSION) -> dict[str, str]:
    r = http.post(path, json=body, headers=KEY)
    assert r.status_code in (200, 201), r.text
    return {"Authorization": f"Bearer {r.json()['jwt']}"}


def offline_body(n: int, serial: str = "S1", event: str = EVENT) -> bytes:
    scans = [{"token": f"T{i}", "status": "Admit", "scanTimestamp": "2025-10-02T18:32:45-05:00",
              "inputType": "Barcode", "barcodeType": "Barcode"} for i in range(n)]
    batch = {"serialNumber": serial, "dataAccountId": "390", "venueCd": "TS", "deviceStatus": "Offline",
             "scanMode": "Entry", "eventId": event, "scans": scans}
    return gzip.compress(json.dumps([batch]).encode())


UPLOAD = {**KEY, "Content-Type": "application/json", "Content-Encoding": "gzip", "Filename": "S1_20251002T233245Z"}


def messages(r: httpx.Response) -> list[str]:
    body = r.json()
    assert set(body["error"]) == {"message", "error", "statusCode"} and body["error"]["statusCode"] == r.status_code
    return body["error"]["message"]


def test_create_session_answers_201_with_a_jwt_and_lite_200_with_a_limited_one(sim, http):
    full = http.post("/session", json=SESSION, headers=KEY)
    lite = http.post("/session/lite", json={k: SESSION[k] for k in ("venueCode", "dataAccountId", "serialNumber")},
                     headers=KEY)
    assert (full.status_code, lite.status_code) == (201, 200)
    assert "integratorType" not in jwt_decode(full.json()["jwt"], sim._key, time.time())
    assert jwt_decode(lite.json()["jwt"], sim._key, time.time())["integratorType"] == "LIMITED"


@pytest.mark.parametrize("headers", [{}, {"API-Authorization-Key": "WRONG"}])
def test_missing_or_wrong_api_key_is_401_in_the_spec_error_shape(http, headers):
    r = http.post("/session", json=SESSION, headers=headers)
    assert r.status_code == 401 and messages(r) == ["Invalid API-Authorization-Key"]


def test_session_body_is_checked_field_by_field(http):
    body = {**SESSION, "make": "", "softwareMode": "Kiosk", "wifiChannel": "6", "colour": "red"}
    del body["model"]
    r = http.post("/session", json=body, headers=KEY)
    assert r.status_code == 400
    assert set(messages(r)) == {"property colour should not exist", "model should not be empty",
                                "make should not be empty", "wifiChannel must be an integer number",
                                "softwareMode must be one of the following values: Handheld, Pedestal"}


def test_unknown_venue_is_404(http):
    r = http.post("/session", json={**SESSION, "venueCode": "XX"}, headers=KEY)
    assert r.status_code == 404 and messages(r) == ["Venue XX not found for data account 390"]


def test_content_type_must_be_json(http):
    r = http.post("/session", content=json.dumps(SESSION), headers={**KEY, "Content-Type": "text/plain"})
    assert r.status_code == 400 and messages(r) == ["Content-Type must be application/json"]


def test_expired_forged_or_missing_jwt_is_401(sim, http):
    sim.clock = lambda: time.time() - 7200
    old = bearer(http)
    sim.clock = time.time
    forged = jwt_encode({"exp": time.time() + 60, "jti": "x"}, b"not the key")
    for headers, why in ((old, "jwt expired"), ({"Authorization": f"Bearer {forged}"}, "invalid signature"),
                         ({}, "Missing Authorization: Bearer token")):
        r = http.post("/ping", json={}, headers=headers)
        assert r.status_code == 401 and messages(r) == [why]


def test_revoked_sessions_are_refused_and_a_new_one_works(sim, http):
    auth = bearer(http)
    sim.revoke_sessions()
    assert http.post("/ping", json={}, headers=auth).status_code == 401
    assert http.post("/ping", json={}, headers=bearer(http)).status_code == 200


def test_limited_session_may_get_events_and_look_up_but_not_validate_or_ping(http):
    auth = bearer(http, "/session/lite", {"venueCode": "TS", "dataAccountId": "390", "serialNumber": "S1"})
    events = http.post("/events", json={}, headers=auth)
    assert events.status_code == 200 and events.json()["events"][0]["barcodeMasks"] == ["390##########"]
    assert http.post("/scan/lookup/NOPE", json={}, headers=auth).status_code == 404
    body = {"token": "T", "inputType": "Barcode", "scanMode": "Entry"}
    assert http.post("/scan/validate", json=body, headers=auth).status_code == 401
    assert http.post("/ping", json={}, headers=auth).status_code == 401


def test_validate_scan_requires_token_input_type_and_scan_mode(http):
    r = http.post("/scan/validate", json={"inputType": "Camera", "scanMode": "In"}, headers=bearer(http))
    assert r.status_code == 400 and set(messages(r)) == {
        "token should not be empty", "inputType must be one of the following values: NFC, Barcode, Key, Swipe",
        "scanMode must be one of the following values: Entry, Exit"}


def test_get_venues_uses_the_api_key(http):
    body = {k: SESSION[k] for k in ("dataAccountId", "serialNumber", "make", "model")}
    assert http.post("/venues", json=body).status_code == 401
    r = http.post("/venues", json=body, headers=KEY)
    assert r.json() == {"venues": [{"facilityCode": "TS", "title": "Titan Stadium",
                                    "venueTimezone": "America/Los_Angeles"}]}


def test_offline_upload_of_100_scans_is_accepted_and_101_refused(sim, http):
    ok = http.post(f"/offline/{EVENT}", content=offline_body(100), headers=UPLOAD)
    assert ok.status_code == 200 and ok.json()["message"].endswith("/S1_20251002T233245Z.json")
    big = http.post(f"/offline/{EVENT}", content=offline_body(101), headers={**UPLOAD, "Filename": "S1_2"})
    assert big.status_code == 400 and messages(big) == ["The request payload is limited to 100 scans; got 101"]
    assert sim.upload_requests == 1 and len(sim.received_scans()) == 100


@pytest.mark.parametrize("drop,why", [
    ("Filename", "Filename header is required ({serialNumber_timestamp})"),
    ("Content-Encoding", "Content-Encoding must be gzip (raw gzip binary body)"),
    ("API-Authorization-Key", "Invalid API-Authorization-Key"),
    ("Content-Type", "Content-Type must be application/json"),
])
def test_offline_upload_without_a_required_header_is_refused(sim, http, drop, why):
    headers = {k: v for k, v in UPLOAD.items() if k != drop}
    r = http.post(f"/offline/{EVENT}", content=offline_body(1), headers=headers)
    assert r.status_code in (400, 401) and messages(r) == [why] and sim.received_scans() == []


@pytest.mark.parametrize("path,content,headers,why", [
    (f"/offline/{EVENT}", json.dumps([]).encode(), {"Content-Encoding": "identity"},
     "Content-Encoding must be gzip (raw gzip binary body)"),
    (f"/offline/{EVENT}", b"not gzip", {}, None),
    ("/offline/SIM-EVT1", offline_body(1), {}, "eventId must be in the format {dataAccountId:seasonCd:eventCd}"),
    ("/offline/390:SIM:OTHER", offline_body(1), {}, "[0].eventId 390:SIM:EVT1 does not match the path's 390:SIM:OTHER"),
    (f"/offline/{EVENT}", offline_body(1), {"Filename": "S2_20251002"},
     "Filename S2_20251002 is not in the format {serialNumber_timestamp}"),
    (f"/offline/{EVENT}", gzip.compress(b"[]"), {}, "Body must be a non-empty JSON array of offline scan batches"),
])
def test_offline_upload_with_a_bad_body_or_path_is_refused(sim, http, path, content, headers, why):
    r = http.post(path, content=content, headers={**UPLOAD, **headers})
    assert r.status_code == 400
    if why is not None:
        assert why in (messages(r) if "error" in r.json() else [r.json()["message"]])
    assert sim.received_scans() == []


def test_offline_scan_needs_a_time_with_its_utc_offset(sim, http):
    batch = json.loads(gzip.decompress(offline_body(1)))
    batch[0]["scans"][0]["scanTimestamp"] = "2025-10-02T18:32:45"
    r = http.post(f"/offline/{EVENT}", content=gzip.compress(json.dumps(batch).encode()), headers=UPLOAD)
    assert r.status_code == 400 and messages(r) == [
        "[0].scans[0].scanTimestamp must be an ISO 8601 date and time with a UTC offset"]


def test_the_same_filename_replaces_the_file_as_entrys_bucket_does(sim, http):
    for _ in range(2):
        assert http.post(f"/offline/{EVENT}", content=offline_body(3), headers=UPLOAD).status_code == 200
    assert len(sim.received_scans()) == 3 and set(sim.arrivals.values()) == {2}


def test_shipped_ticket_file_loads(tmp_path):
    tickets = read_tickets(str(Path(__file__).parent.parent / "config" / "entry-sim-tickets.csv"), EVENT)
    assert [t.status for t in tickets] == ["valid", "valid", "void"] and tickets[0].first_name == "Ada"


def test_command_line_help_names_the_dry_run_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--tickets FILE" in out and "--port" in out
