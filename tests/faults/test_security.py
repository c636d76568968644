"""Security: owner-only secrets, systemd credentials, TLS that stays verified, optional CA pinning, no
tokens or secrets in the logs, parameterised SQL, and refused credentials that cost no retry storm.

The unit's exposure score (`systemd-analyze security`, at most 2.0) is checked in
tests/test_systemd_unit.py, and the journal fields of a scan in tests/test_journal.py.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import re
import secrets
import signal
from pathlib import Path

import gated_faults_backends as backends  # tests/faults/backends.py, registered by conftest.py
import pytest

from gated import config as configmod
from gated.daemon import build
from gated.errors import ConfigError
from gated.model import Scan, Source, Verdict
from gated.secrets import read_secret

ROOT = Path(__file__).resolve().parents[2]


# --- secret files -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_a_secret_file_others_can_read_is_refused_naming_the_key_and_the_fix(tmp_path, mode):
    path = tmp_path / "api.key"
    path.write_text("S3CRET\n")
    path.chmod(mode)
    with pytest.raises(ConfigError) as e:
        read_secret(str(path), "[backend.entry] api_key_file")
    (problem,) = e.value.problems
    assert problem == (f'[backend.entry] api_key_file = "{path}": readable by others (mode {mode:03o}); '
                       f"secrets must be owner-only: chmod 600 {path}")
    assert "S3CRET" not in problem


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_secret_file_is_read(tmp_path, mode):
    path = tmp_path / "api.key"
    path.write_text("  S3CRET\n")
    path.chmod(mode)
    assert read_secret(str(path), "[backend.entry] api_key_file") == "S3CRET"


SECRET_KEYS = {"entry": "api_key_file", "pretix": "token_file", "pretixdroid": "key_file", "cm": "password_file"}


@pytest.mark.parametrize("backend", [b for b in backends.available_backends() if b in SECRET_KEYS])
def test_gated_run_with_a_group_readable_secret_says_which_key_and_how_to_fix_it(backend, make_kit, write_config,
                                                                                 run_gated, tmp_path, caplog):
    kit = make_kit(backend)
    config = write_config(kit.toml(kit.sim.url))
    secret = Path(configmod.load(str(config)).backend_options[SECRET_KEYS[backend]])
    secret.chmod(0o640)
    gated = run_gated(config)
    where = f"[backend.{backend}] {SECRET_KEYS[backend]}"
    line = gated.wait_line(re.escape(f'{where} = "{secret}": readable by others (mode 640)'))
    assert f"chmod 600 {secret}" in line
    gated.signal(signal.SIGTERM)
    gated.wait_exit()
    assert secret.read_text().strip() not in "\n".join(gated.seen)


def test_a_systemd_credential_is_used_when_the_config_names_it(make_kit, load_config, tmp_path, monkeypatch):
    kit = make_kit("entry")
    kit.sim.api_key = secrets.token_urlsafe(24)
    creds = tmp_path / "credentials"  # what systemd makes for LoadCredential=entry.key:/root/entry.key
    creds.mkdir()
    (creds / "entry.key").write_text(kit.sim.api_key + "\n")
    (creds / "entry.key").chmod(0o440)  # systemd's own mode for credentials; read_secret trusts the directory
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    toml = kit.toml(kit.sim.url)
    toml = toml.replace(f'api_key_file = "{tmp_path / "entry-api.key"}"', 'api_key_file = "entry.key"')
    cfg = load_config(toml)
    assert cfg.backend_options.api_key_file.endswith("/entry.key")

    async def run():
        parts = await build(cfg)
        try:
            return await parts.gate.handle(Scan(token=kit.tokens[0], reader="front"))
        finally:
            await parts.close()

    decision = asyncio.run(run())
    assert decision.source is Source.ONLINE and decision.admitted
    assert kit.sim.requests_to("/session")[0].headers["api-authorization-key"] == kit.sim.api_key


# --- TLS ----------------------------------------------------------------------------------------


def _schemas() -> dict[str, dict]:
    out = {f"[{name}]": schema for name, schema in configmod.FIXED.items()}
    out["[backend]"] = configmod.BACKEND
    out["[reader.NAME]"] = configmod.READER_COMMON
    for name, module in configmod.AVAILABLE_BACKENDS.items():
        out[f"[backend.{name}]"] = configmod.module_schema(module)
    for name, module in configmod.AVAILABLE_READERS.items():
        out[f"[reader.NAME] ({name})"] = configmod.module_schema(module)
    return out


def test_no_config_key_can_turn_tls_verification_off():
    words = ("verify", "insecure", "ssl", "tls", "cert", "check_hostname")
    found = [f"{where} {key}" for where, schema in _schemas().items() for key in schema
             if any(w in key.lower() for w in words)]
    assert found == []  # ca_file adds a CA to trust; nothing takes verification away


@pytest.mark.parametrize("line", ["verify = false", "tls_verify = false", "insecure = true", "verify_ssl = false"])
def test_a_key_that_tries_to_turn_tls_off_is_refused(load_config, line):
    with pytest.raises(ConfigError) as e:
        load_config(f'[backend]\ntype = "pretixdroid"\nurl = "https://x.example"\n{line}\n[backend.pretixdroid]\n'
                    f'organizer = "o"\nevent = "e"\nkey_file = "/dev/null"\n')
    assert any(p.startswith(f"[backend] {line.split()[0]}: unknown key.") for p in e.value.problems)


@pytest.mark.parametrize(("trust", "online"), [("test CA", True), ("no ca_file", False), ("another CA", False)])
@pytest.mark.parametrize("backend", backends.available_backends())
def test_ca_file_pins_the_api_to_servers_signed_by_that_ca(backend, trust, online, make_kit, make_proxy,
                                                            tls_material, load_config):
    kit = make_kit(backend)
    proxy = make_proxy(kit.port, tls=tls_material)  # HTTPS on 127.0.0.1, certificate signed by the test CA
    ca = {"test CA": str(tls_material.ca_file), "no ca_file": "", "another CA": str(tls_material.other_ca_file)}

    async def run():
        # Paired and synced while the right CA was configured, as an installed gate would be.
        parts = await build(load_config(kit.toml(proxy.url, ca_file=str(tls_material.ca_file))))
        try:
            await kit.prepare(parts)
        finally:
            await parts.close()
        cfg = load_config(kit.toml(proxy.url, ca_file=ca[trust]))
        cfg.lane["debounce_seconds"] = 0.0
        parts = await build(cfg)
        try:
            return await parts.gate.handle(Scan(token=kit.tokens[0], reader="front"))
        finally:
            await parts.close()

    decision = asyncio.run(run())
    if online:
        assert decision.source is Source.ONLINE and decision.admitted
    else:
        assert decision.source is Source.OFFLINE and "CERTIFICATE_VERIFY_FAILED" in decision.detail, decision.detail


# --- nothing secret in the logs -----------------------------------------------------------------


def _secrets_of(kit, config: Path) -> list[str]:
    options = configmod.load(str(config)).backend_options
    found = [Path(options[k]).read_text().strip() for k in ("api_key_file", "token_file", "key_file", "password_file")
             if options.get(k)]
    return found


@pytest.mark.parametrize("backend", backends.available_backends())
def test_a_full_run_with_debug_logging_never_shows_a_ticket_code_or_a_secret(backend, make_kit, make_proxy,
                                                                             write_config, run_gated, tmp_path):
    kit = make_kit(backend)
    proxy = make_proxy(kit.port)
    if backend == "entry":
        kit.sim.api_key = "ENTRY-" + secrets.token_urlsafe(18)
        (tmp_path / "entry-api.key").write_text(kit.sim.api_key)
    if backend == "pretixdroid":
        kit.sim.key = "DROID-" + secrets.token_urlsafe(18)  # travels in the query string
        (tmp_path / "droid.key").write_text(kit.sim.key)
    config = write_config(kit.toml(proxy.url, deadline=0.5))
    config.write_text(config.read_text() + "\n[log]\ndebug = true\n")
    if backend == "tibillet":  # paired beforehand, as an installer does: the key lives in the store
        assert _pair(config, kit) == 0
    gated = run_gated(config)
    gated.wait_line(r"ready in \d+ ms", timeout=20)
    gated.feed(kit.tokens[0])
    assert gated.verdict(timeout=10)["source"] == "online"
    proxy.set("status:503")
    gated.feed(*kit.tokens[1:])
    assert [gated.verdict(timeout=10)["source"] for _ in kit.tokens[1:]] == ["offline"] * 2
    proxy.set("pass")
    gated.wait_line(r"uploaded 2 scans", timeout=20)
    assert gated.stop() == 0
    log = "\n".join(gated.seen)
    hidden = [*kit.tokens, *_secrets_of(kit, config), *_issued_credentials(kit)]
    assert [s for s in hidden if s in log] == []
    assert all(f"…{t[-4:]}" in log for t in kit.tokens)  # the lines are there, redacted


def _pair(config: Path, kit) -> int:
    from gated import cli

    return cli.main(["pair", "--config", str(config), kit.sim.new_device("Log lane")])


def _issued_credentials(kit) -> list[str]:
    """Session tokens and keys the simulator handed out during the run."""
    sim = kit.sim
    out = []
    for r in sim.requests:
        auth = r.headers.get("authorization", "")
        if " " in auth:
            out.append(auth.split(" ", 1)[1])
    if kit.name == "tibillet":
        out += list(sim.keys)
    return [c for c in set(out) if len(c) >= 8]


# --- SQL ----------------------------------------------------------------------------------------

SQL_SINKS = {"execute", "executemany", "executescript", "query", "_one"}
# Statements built at run time, each with why it cannot carry a value from outside.
ALLOWED = {
    ("gated/store/connection.py", "_one"): "executes its `sql` argument; every caller of _one is itself checked here",
    ("gated/store/journal.py", "count"):
        "`where` is a literal clause written by its callers (tests); values go in `params`",
    ("gated/policy/cm.py", "_still_pending"): "builds only the `?` placeholders; the values are parameters",
    ("gated/store/wal.py", "cut_wal"): "a PRAGMA takes no parameters; its value is an int computed from a file size",
    ("gated/store/lists.py", "build_list"): "runs LIST_SCHEMA, a constant of the module with no values in it",
    ("gated/store/lists.py", "_insert_tickets"):
        "_INSERT_TICKETS is made once from TICKET_COLUMNS, the module's own column names; values are parameters",
}


def _dynamic_sql(sources: dict[str, str]) -> list[tuple[str, str, int, str]]:
    """(file, function, line, code) of every SQL call whose statement is not a plain string literal."""
    found = []
    for rel, source in sources.items():
        for func in ast.walk(ast.parse(source)):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                first = node.args[0]
                # f-strings, `%`, `+`, .format() and variables all land here: only a literal is safe.
                if name in SQL_SINKS and not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    found.append((rel, func.name, node.lineno, ast.unparse(node)[:100]))
    return found


def _gated_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted((ROOT / "gated").rglob("*.py"))}


def test_every_sql_statement_in_gated_is_a_literal_with_parameters_or_allow_listed_with_a_reason():
    found = _dynamic_sql(_gated_sources())
    offenders = [f"{f}:{line} in {fn}(): {code}" for f, fn, line, code in found if (f, fn) not in ALLOWED]
    assert offenders == []


@pytest.mark.parametrize("statement", ['f"SELECT * FROM t WHERE n = \'{name}\'"', '"SELECT * FROM t WHERE n = " + name',
                                       '"SELECT * FROM t WHERE n = %s" % name', '"SELECT {}".format(name)', "sql"])
def test_the_sql_scan_catches_statements_built_from_values(statement):
    source = f"def lookup(db, name, sql):\n    return db.execute({statement})\n"
    assert [fn for _, fn, _, _ in _dynamic_sql({"x.py": source})] == ["lookup"]
    assert _dynamic_sql({"x.py": 'def ok(db, n):\n    return db.execute("SELECT * FROM t WHERE n = ?", (n,))\n'}) == []


# --- refused credentials: offline, said, and no storm of retries --------------------------------


def _refuse(kit, how: str) -> None:
    sim = kit.sim
    if how == "expired_jwt":  # Entry's clock runs ahead: every session it issues has already expired
        sim.jwt_ttl = -60
        sim.revoke_sessions()
    elif kit.name == "entry":
        sim.api_key = "ROTATED-" + secrets.token_hex(8)
        sim.revoke_sessions()  # and the session made with the old key has expired
    elif kit.name == "pretix":
        for device in sim.setup_tokens.values():
            device.token = "revoked-" + secrets.token_hex(8)
    elif kit.name == "pretixdroid":
        sim.key = "ROTATED-" + secrets.token_hex(8)
    elif kit.name == "tibillet":
        sim.keys.clear()  # the device archived in the admin
    elif kit.name == "cm":
        sim.expire_tokens()
        sim.password = "changed-" + secrets.token_hex(8)


@pytest.mark.parametrize(("backend", "how"), [(b, "rotated") for b in backends.available_backends()]
                         + [("entry", "expired_jwt")])
def test_refused_credentials_mean_offline_decisions_one_error_and_no_retry_storm(backend, how, make_kit,
                                                                                 load_config, caplog):
    caplog.set_level(logging.INFO, logger="gated")
    kit = make_kit(backend, n_tokens=20)
    cfg = load_config(kit.toml(kit.sim.url).replace("probe_interval_seconds = 0.05", "probe_interval_seconds = 5"))
    cfg.lane["debounce_seconds"] = 0.0

    async def run():
        parts = await build(cfg)
        try:
            await kit.prepare(parts)
            _refuse(kit, how)
            decisions, asked = [], []
            for token in kit.tokens:
                mark = len(kit.sim.requests)
                decisions.append(await parts.gate.handle(Scan(token=token, reader="front")))
                asked.append([r.path for r in kit.sim.requests[mark:]])
            return decisions, asked
        finally:
            await parts.close()

    decisions, asked = asyncio.run(run())
    assert all(d.source is Source.OFFLINE for d in decisions)
    assert all(d.verdict is Verdict.ADMIT for d in decisions)  # every kit ticket is valid offline
    # Two failures open the breaker; each may renew its session on the way. The other 18 ask nothing.
    assert all(len(paths) <= 5 for paths in asked[:2]), asked[:2]
    assert asked[2:] == [[]] * 18, asked
    faults = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "gated.scan"]
    assert 1 <= len(faults) <= 3, [r.getMessage() for r in faults]

