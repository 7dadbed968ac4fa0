"""Issue 11, confidentiality: nothing of an encrypted report leaks, in mail or at rest.

- item 1: mail to a reporter who wrote encrypted goes out encrypted or not at all (``#reply``), the ack asks
  for their key, and an ``Autocrypt:`` header is recorded like an attached key;
- item 2: report content is encrypted at rest (:mod:`mailer.atrest`): the SQLite files and a ``pg_dump``
  hold none of it, legacy plaintext rows are sealed at start, the data key rotates;
- item 14: mail to the reporter threads onto their last message;
- item 15: ``#cvss`` and ``#severity`` that disagree are flagged.

Mail is built the way the clients build it (:mod:`tests.gpgtools`), the service runs for real.
"""

# ruff: noqa: F811 - the `keys` fixture is imported from tests.test_openpgp_flow and named by the tests
from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select, text

from mailer import atrest
from mailer.app import Service
from mailer.cli.views import report_detail
from mailer.errors import ConfigError
from mailer.models import Attachment, Event, OutboxMessage, Report, ReportKey, ReportMessage
from tests.conftest import smtp_port
from tests.gpgtools import inner_text_entity
from tests.relay import CaptureRelay
from tests.test_commands import signed
from tests.test_intake import asend
from tests.test_openpgp_flow import (
    KEYED,
    REPORTER,
    Keys,
    autocrypt_header,
    client_gpg,
    envelope,
    keys,  # noqa: F401 - the module-scoped key fixture
    running,
    thunderbird,
)

# Marker words of the encrypted report: none may be found in the database files or a dump.
MARKERS = ("Wombatquux", "Okapinimbus", "Narwhalzest", "Pangolinfizz")
SUBJECT = "Wombatquux injection in the search form"
BODY = ("Description: Okapinimbus query concatenation in search.py line 42\n"
        "Steps to reproduce: search for Narwhalzest' OR 1=1 --\n"
        "Affected versions: 2.1\n")
ATTACHMENT = ("pangolinfizz-poc.py", b"print('Pangolinfizz proof of concept')\n")


def encrypted_report(keys: Keys, service: Service, *, extra: str = "") -> bytes:
    """Thunderbird: PGP/MIME, signed and encrypted, protected Subject, a proof-of-concept attached."""
    client_gpg(keys.reporter, service)
    inner = inner_text_entity(BODY, subject=SUBJECT, attachment=ATTACHMENT)
    return thunderbird(keys.reporter, [service.fingerprint], inner, signer=keys.reporter_fpr, extra=extra)


def _found(blob: bytes) -> list[str]:
    low = blob.lower()
    return [m for m in MARKERS if m.lower().encode() in low or m.encode().hex().encode() in low
            or m.lower().encode().hex().encode() in low]


def database_bytes(service: Service) -> bytes:
    """Everything the database holds, as an attacker with the files or a dump sees it."""
    url = service.config.database_url
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())
    name = url.rsplit("/", 1)[1]
    dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "--no-owner", name],
                          capture_output=True, check=True, timeout=60)
    assert b"report_messages" in dump.stdout
    return dump.stdout


def stored_raw(service: Service, table: str, column: str) -> list[object]:
    with service.db.engine.connect() as conn:
        return [row[0] for row in conn.execute(text(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"))]


# --------------------------------------------------------------------------- item 2: at rest


async def test_encrypted_report_is_not_in_the_database_files_or_a_dump(tmp_path: Path, migrated: str,
                                                                       relay: CaptureRelay, keys: Keys) -> None:
    """Item 2: subject, fields, body, attachment and raw message are ciphertext at rest; the CLI reads them."""
    async with running(tmp_path, migrated, relay, keys) as service:
        await asend(smtp_port(service), encrypted_report(keys, service))
        await service.settle()
        with service.db.session() as s:
            [report] = s.scalars(select(Report))
            detail = report_detail(report)
            [attachment] = s.scalars(select(Attachment))
            assert (attachment.filename, attachment.data) == ATTACHMENT
        # transparent for the CLI, notices and commands
        assert detail["subject"] == SUBJECT and "Okapinimbus" in detail["fields"]["description"]
        assert "Narwhalzest" in detail["messages"][0]["body_text"]
        assert _found(database_bytes(service)) == []
        # each value carries the id of the key it is encrypted with
        ring = atrest.installed()
        assert ring is not None
        for table, column in (("report_messages", "body_text"), ("reports", "subject"), ("reports", "fields"),
                              ("attachments", "data"), ("inbound_messages", "raw"), ("events", "detail"),
                              ("outbox", "raw")):  # the sender seals the signed bytes itself, before its write
            values = stored_raw(service, table, column)
            assert values and {atrest.value_key_id(v) for v in values} == {ring.current}, (table, column)  # type: ignore[arg-type]
        with service.db.session() as s:  # what was stored sealed is the mail as signed (and encrypted) and sent
            sent = [(row.needs_signature, row.raw) for row in s.scalars(select(OutboxMessage))]
        assert sent and all(not unsigned and b"-----BEGIN PGP " in raw for unsigned, raw in sent)
        key_file = service.config.service.data_dir / "data.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_legacy_plaintext_rows_are_sealed_at_start(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                         keys: Keys) -> None:
    """Item 2: rows stored in the clear (before 0006) stay readable and are encrypted by the next start."""
    # the old version is played by this process without a data key: processing must run in this process
    async with running(tmp_path, migrated, relay, keys, worker={"processes": 0}) as service:
        raw = encrypted_report(keys, service)
        atrest.install(None)  # as before this version: no data key, values written in the clear
        await asend(smtp_port(service), raw)
        await service.settle()
        assert _found(database_bytes(service)) != []
    async with running(tmp_path, migrated, relay, keys) as service:
        assert _found(database_bytes(service)) == []
        with service.db.session() as s:
            [message] = s.scalars(select(ReportMessage).where(ReportMessage.direction == "in"))
            assert "Okapinimbus" in message.body_text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_rotate_data_key_reencrypts_everything(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                     keys: Keys) -> None:
    """Item 2: `mailer keys rotate-data-key` adds a key to the 0600 file and re-encrypts every value with it."""
    from tests.test_cli import _json, mailer

    async with running(tmp_path, migrated, relay, keys) as service:
        await asend(smtp_port(service), encrypted_report(keys, service))
        await service.settle()
        old = atrest.installed()
        assert old is not None
        code, out = await mailer(service.config, "keys", "rotate-data-key", "--json")
        assert code == 0, out
        result = _json(out)
        assert isinstance(result, dict) and result["reencrypted"] > 5 and result["key_id"] != old.current
        key_file = service.config.service.data_dir / "data.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert len([ln for ln in key_file.read_text().splitlines() if not ln.startswith("#")]) == 2
        assert {atrest.value_key_id(v) for v in stored_raw(service, "report_messages", "body_text")} == {result["key_id"]}  # type: ignore[arg-type]
        atrest.install(atrest.load_keyring(service.config.service.data_dir, None))
        with service.db.session() as s:
            [message] = s.scalars(select(ReportMessage).where(ReportMessage.direction == "in"))
            assert "Okapinimbus" in message.body_text


def test_data_key_from_the_environment_or_a_file(tmp_path: Path) -> None:
    """Item 2: MAILER_DATA_KEY wins; a key file readable by others is refused; a value names its key."""
    key = os.urandom(32)
    ring = atrest.load_keyring(tmp_path, None, {atrest.ENV: base64.b64encode(key).decode()})
    assert ring.current == atrest.key_id(key) and not (tmp_path / "data.key").exists()
    sealed = ring.seal_text("Wombatquux", "reports.subject")
    assert "Wombatquux" not in sealed and atrest.value_key_id(sealed) == ring.current
    assert ring.open_text(sealed, "reports.subject") == "Wombatquux"
    with pytest.raises(atrest.DataKeyError):  # bound to its column
        ring.open_text(sealed, "report_messages.body_text")
    loose = tmp_path / "loose.key"
    loose.write_text(base64.b64encode(key).decode() + "\n")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        atrest.load_keyring(tmp_path, loose, {})
    loose.chmod(0o600)
    assert atrest.load_keyring(tmp_path, loose, {}).current == ring.current


# --------------------------------------------------------------------------- item 1: encrypted or not at all


def mutt_encrypted(keys: Keys, service: Service, *, extra: str = "") -> bytes:
    """Mutt: PGP/MIME signed+encrypted, no key attached."""
    client_gpg(keys.reporter, service)
    inner = inner_text_entity("Description: SQL injection\nAffected versions: 2.1\n", subject="SQL injection")
    return thunderbird(keys.reporter, [service.fingerprint], inner, signer=keys.reporter_fpr, extra=extra)


async def test_reply_to_an_encrypted_report_without_key_is_refused(tmp_path: Path, migrated: str,
                                                                   relay: CaptureRelay, keys: Keys) -> None:
    """Item 1: `#reply` is refused (nothing sent); the ack asks for the key; `--unencrypted` sends, recorded."""
    async with running(tmp_path, migrated, relay, keys) as service:
        await asend(smtp_port(service), mutt_encrypted(keys, service))
        await service.settle()
        [ack] = relay.handler.to(REPORTER)
        assert "send your public key" in ack.text
        with service.db.session() as s:
            [report] = s.scalars(select(Report))
        body = f"#report {report.tracking_id}\n#reply\n\nThe vulnerable query is in search.py line 42."
        home, fpr = keys.maintainer, keys.maintainer_fpr
        await asend(smtp_port(service), signed(home, fpr, body, from_=KEYED, msgid="<r1@project.test>"), sender=KEYED)
        await service.settle()
        assert len(relay.handler.to(REPORTER)) == 1  # nothing more went to the reporter
        transcript = relay.handler.to(KEYED)[-1]
        from tests.test_commands import open_for

        refusal = open_for(home, transcript.raw)
        assert "NOTHING was applied" in refusal and "--unencrypted" in refusal
        body = f"#report {report.tracking_id}\n#reply --unencrypted\n\nWe are looking into it."
        await asend(smtp_port(service), signed(home, fpr, body, from_=KEYED, msgid="<r2@project.test>"), sender=KEYED)
        await service.settle()
        reply = relay.handler.to(REPORTER)[-1]
        assert "We are looking into it." in reply.text
        with service.db.session() as s:
            [sent] = s.scalars(select(Event).where(Event.kind == "reply.sent"))
            assert sent.actor == fpr and sent.detail["unencrypted"] is True


async def test_autocrypt_key_is_recorded_like_an_attached_one(tmp_path: Path, migrated: str,
                                                              relay: CaptureRelay, keys: Keys) -> None:
    """Item 1: a follow-up carrying an Autocrypt header gives the reporter's key; `#reply` then goes encrypted."""
    async with running(tmp_path, migrated, relay, keys) as service:
        await asend(smtp_port(service), mutt_encrypted(keys, service))
        await service.settle()
        with service.db.session() as s:
            [report] = s.scalars(select(Report))
        part = (b"Content-Type: text/plain; charset=UTF-8\r\n\r\nHere is my key, by Autocrypt.\r\n")
        follow = envelope(part, subject=f"Re: [{report.tracking_id}] Your encrypted report was received",
                          extra=autocrypt_header(REPORTER, keys.reporter, keys.reporter_fpr))
        await asend(smtp_port(service), follow)
        await service.settle()
        with service.db.session() as s:
            [key] = s.scalars(select(ReportKey))
            assert key.source == "message" and key.report_id == report.id
        body = f"#report {report.tracking_id}\n#reply\n\nThe vulnerable query is in search.py line 42."
        home, fpr = keys.maintainer, keys.maintainer_fpr
        await asend(smtp_port(service), signed(home, fpr, body, from_=KEYED, msgid="<r3@project.test>"), sender=KEYED)
        await service.settle()
        reply = relay.handler.to(REPORTER)[-1]
        assert reply.message.get_content_type() == "multipart/encrypted" and b"search.py" not in reply.raw
        # item 14: threaded onto the reporter's last message
        with service.db.session() as s:
            last = s.scalars(select(ReportMessage.message_id).where(ReportMessage.direction == "in")
                             .order_by(ReportMessage.id.desc())).first()
        assert reply.message["In-Reply-To"] == last and last in reply.message["References"]


async def test_cvss_and_severity_that_disagree_are_flagged(tmp_path: Path, migrated: str, relay: CaptureRelay,
                                                           keys: Keys) -> None:
    """Item 15: a Critical CVSS with `#severity high` is flagged in the transcript."""
    async with running(tmp_path, migrated, relay, keys) as service:
        await asend(smtp_port(service), mutt_encrypted(keys, service))
        await service.settle()
        with service.db.session() as s:
            [report] = s.scalars(select(Report))
        body = (f"#report {report.tracking_id}\n#severity high\n"
                "#cvss CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H\n")
        home, fpr = keys.maintainer, keys.maintainer_fpr
        await asend(smtp_port(service), signed(home, fpr, body, from_=KEYED, msgid="<r4@project.test>"), sender=KEYED)
        await service.settle()
        from tests.test_commands import open_for

        text_ = open_for(home, relay.handler.to(KEYED)[-1].raw).lower()
        assert "rates critical but the severity is high" in text_
