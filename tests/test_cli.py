"""The `mailer` command line and the configuration contract, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailer.app import Service
from mailer.config import Config, load_config
from mailer.errors import ConfigError
from tests.conftest import run, smtp_port
from tests.test_intake import asend, report_bytes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "mailer.example.toml"


async def mailer(config: Config, *argv: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run the installed CLI against the test's database and keyring (configured by environment)."""
    env = {
        "MAILER_DATABASE_URL": config.database_url,
        "MAILER_SERVICE_DATA_DIR": str(config.service.data_dir),
        "MAILER_GNUPG_HOME": str(config.gnupg_home),
    }
    code = f"import sys; from mailer.cli import main; sys.exit(main({list(argv)!r}))"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return await run(sys.executable, "-c", code, stdin=stdin)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _json(out: str) -> object:
    """The JSON document in the output (log lines go to stderr, merged here, and start with a date)."""
    start = min(i for i in (out.find("["), out.find("{")) if i >= 0)
    return json.loads(out[start:])


async def test_unmigrated_database_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    """Every command but `db upgrade` refuses an unmigrated database and says what to run."""
    cfg = Config.model_validate({"service": {"data_dir": str(tmp_path)}, "database": {"url": f"sqlite:///{tmp_path}/x.db"}})
    code, out = await mailer(cfg, "reports", "list")
    assert code == 1
    assert "run `mailer db upgrade` first" in out
    code, out = await mailer(cfg, "db", "upgrade")
    assert code == 0, out
    code, out = await mailer(cfg, "reports", "list", "--json")
    assert code == 0 and _json(out) == []


async def test_reports_list_and_show_json_shapes(service: Service) -> None:
    """`reports list --json` is an array of report objects; `reports show --json` adds messages and events."""
    await asend(smtp_port(service), report_bytes(body="Description: overflow\n"))
    await service.settle()
    code, out = await mailer(service.config, "reports", "list", "--json")
    assert code == 0, out
    [report] = _json(out)  # type: ignore[misc]
    assert {"id", "state", "reporter", "subject", "created_at"} <= set(report)
    assert report["id"].startswith("SEC-") and report["state"] == "acknowledged"
    assert report["reporter"] == "rita@reporter.test"
    code, out = await mailer(service.config, "reports", "show", report["id"], "--json")
    detail = _json(out)
    assert isinstance(detail, dict)
    assert detail["id"] == report["id"]
    assert [m["kind"] for m in detail["messages"]][:2] == ["report", "ack"]
    assert "report.filed" in [e["kind"] for e in detail["events"]]
    assert detail["fields"]["description"] == "overflow"
    code, out = await mailer(service.config, "reports", "show", "SEC-1999-0001")
    assert code == 1 and "no report SEC-1999-0001" in out


async def test_outbox_list_and_retry(service: Service) -> None:
    """`outbox list --json` shows delivery state; `outbox retry` re-queues a failed message."""
    await asend(smtp_port(service), report_bytes())
    await service.worker.drain()
    code, out = await mailer(service.config, "outbox", "list", "--json")
    rows = _json(out)
    assert isinstance(rows, list) and {r["state"] for r in rows} == {"pending"}
    assert {"id", "kind", "state", "report", "message_id", "to", "attempts"} <= set(rows[0])
    code, out = await mailer(service.config, "outbox", "retry", "9999")
    assert code == 1 and "no unsent outgoing message with id 9999" in out


async def test_failed_list_and_retry(service: Service) -> None:
    """`failed list --json` names the failed step; `failed retry ID` queues it again."""
    from mailer.pipeline import PREPARE, Pipeline
    from mailer.processing import Processing
    from mailer.worker import Worker

    def explode(ctx: Processing) -> None:
        raise RuntimeError("broken step")

    await asend(smtp_port(service), report_bytes())
    worker = Worker(service.db, service.config.model_copy(update={"worker": service.config.worker.model_copy(update={"max_attempts": 1})}),
                    service.outbox, gpg=service.gpg, pipeline=Pipeline(prepare=(PREPARE[0], explode)))
    await worker.drain()
    code, out = await mailer(service.config, "failed", "list", "--json")
    [row] = _json(out)  # type: ignore[misc]
    assert row["state"] == "failed" and row["failed_step"] == "explode" and "broken step" in row["last_error"]
    code, out = await mailer(service.config, "failed", "retry", str(row["id"]))
    assert code == 0, out
    await service.settle()
    code, out = await mailer(service.config, "failed", "list", "--json")
    assert _json(out) == []


async def test_keys_commands(service: Service, tmp_path: Path) -> None:
    """keys export/import/list/show work on the service keyring and report usability."""
    code, out = await mailer(service.config, "keys", "export")
    assert code == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in out
    code, out = await mailer(service.config, "keys", "list", "--json")
    [key] = _json(out)  # type: ignore[misc]
    assert key["fingerprint"] == service.fingerprint and "service key" in key["roles"] and key["usable"]
    code, out = await mailer(service.config, "keys", "show", service.fingerprint, "--json")
    assert _json(out)["can_sign"] is True  # type: ignore[index]
    code, out = await mailer(service.config, "keys", "import", "-", stdin=b"not a key")
    assert code == 1


def test_config_error_names_the_key_and_the_variable() -> None:
    """A wrong value stops the start with the key, the variable it came from and the expected form."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"MAILER_SMTP_LISTEN": "localhost"})
    assert "smtp.listen (from MAILER_SMTP_LISTEN)" in str(info.value)
    assert "HOST:PORT" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, {"MAILER_SERVICE_CONTACT": "not-an-address"})
    assert "service.contact" in str(info.value)


def test_unknown_key_and_missing_file_are_errors(tmp_path: Path) -> None:
    """A typo in the file is an error naming the key; a missing file is named."""
    path = tmp_path / "c.toml"
    path.write_text('[smtp]\nlisten = "127.0.0.1:25"\nlistne = "x"\n')
    with pytest.raises(ConfigError, match=r"smtp\.listne: unknown key"):
        load_config(path, {})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", {})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """MAILER_<SECTION>_<KEY> wins over the file; MAILER_CONFIG names the file."""
    path = tmp_path / "c.toml"
    path.write_text('[database]\nurl = "sqlite:///from-file.db"\n[relay]\nurl = "smtp://relay.test:25"\n')
    cfg = load_config(None, {"MAILER_CONFIG": str(path), "MAILER_DATABASE_URL": "postgresql+psycopg://u@h/db",
                             "MAILER_LMTP_LISTEN": "127.0.0.1:8024", "MAILER_SERVICE_CONTACT": "sec@proj.test"})
    assert cfg.database_url == "postgresql+psycopg://u@h/db"
    assert cfg.relay_url == "smtp://relay.test:25"
    assert cfg.lmtp.address == ("127.0.0.1", 8024)
    assert cfg.service.contact == "sec@proj.test"
    assert cfg.sendkey_address == "sec-sendkey@proj.test"


def test_defaults_are_the_embedded_setup() -> None:
    """Without a file: SMTP on 127.0.0.1:8025, SQLite and the outgoing maildir under ./var, LMTP off."""
    cfg = load_config(None, {})
    assert cfg.smtp.address == ("127.0.0.1", 8025)
    assert cfg.lmtp.address is None
    assert cfg.database_url == "sqlite:///var/mailer.db"
    assert cfg.relay_url == "maildir:var/outgoing"


@pytest.mark.parametrize("cpus", [1, 2])
def test_worker_processes_default_follows_the_cpus_the_service_may_use(cpus: int) -> None:
    """worker.processes defaults to 1 with two CPUs or more (the process's affinity), to 0 (threads) with one."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < cpus:
        pytest.fail(f"this test needs {cpus} CPUs; the machine gives {len(allowed)}")
    code = (f"import os; os.sched_setaffinity(0, {set(allowed[:cpus])!r}); "
            "from mailer.config import Config; print(Config.model_validate({}).worker.processes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == ("1" if cpus >= 2 else "0")


def test_example_config_documents_every_key() -> None:
    """config/mailer.example.toml loads and names every key of every section."""
    raw = tomllib.loads(EXAMPLE.read_text())
    load_config(EXAMPLE, {})
    text = EXAMPLE.read_text()
    for section, field in Config.model_fields.items():
        if section == "maintainers":
            for key in field.annotation.__args__[0].model_fields:  # type: ignore[union-attr]
                assert key in raw["maintainers"][0]
            continue
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            assert f"\n{key} =" in text or f"\n# {key} =" in text, f"[{section}] {key} is not documented"


async def test_health_reports_the_running_service_and_its_queues(config: Config) -> None:
    """`mailer health` is ok while the service runs and writes health.json; it names the problem otherwise."""
    code, out = await mailer(config, "health")
    assert code == 2 and "no health file" in out  # down: no service
    svc = Service(config)
    await svc.start(background=True)
    try:
        path = config.service.data_dir / "health.json"
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.05)
        code, out = await mailer(config, "health", "--json")
        data = _json(out)
        assert code == 0, out
        assert isinstance(data, dict) and data["ok"] is True
        assert data["service"]["service_key"] == svc.fingerprint
        assert data["queues"] == {"inbound_waiting": 0, "inbound_failed": 0, "outbox_pending": 0, "outbox_failed": 0,
                                  "received_last_day": {}}
    finally:
        await svc.stop()
        svc.db.dispose()


async def test_serve_names_a_port_in_use_and_an_empty_setup(config: Config) -> None:
    """A listener that cannot bind, or no way to receive mail at all, stops the start with a clear message."""
    import socket

    from mailer.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = config.model_copy(update={"smtp": config.smtp.model_copy(update={"listen": f"127.0.0.1:{port}"})})
        svc = Service(busy)
        with pytest.raises(ConfigError, match=f"smtp.listen: cannot listen on 127.0.0.1:{port}"):
            await svc.start(background=False)
        svc.db.dispose()
    silent = config.model_copy(update={"smtp": config.smtp.model_copy(update={"listen": ""})})
    svc = Service(silent)
    with pytest.raises(ConfigError, match="nothing receives mail"):
        await svc.start(background=False)
    svc.db.dispose()
