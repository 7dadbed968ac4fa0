"""Report content encrypted at rest: AES-256-GCM under a data key kept outside the database.

What a dump, a backup or a shared PostgreSQL shows of a report is ciphertext:
the report's subject and fields, message bodies and metadata, attachments
(name and content), the event log's detail (notes, leak text, transcripts'
facts) and the raw bytes of every received message. The columns use the
types below (:class:`EncryptedText`, :class:`EncryptedBytes`,
:class:`EncryptedJSON`), so every read and write through SQLAlchemy is
transparent: ``reports show``, notices and commands see plaintext.

**The data key** lives outside the database (:func:`load_keyring`):

- ``MAILER_DATA_KEY``: one or more base64 keys of 32 bytes, separated by
  spaces or commas (for deployments that keep secrets in the environment);
- ``[storage] data_key_file``: a file of such keys, one a line;
- else ``<data_dir>/data.key``, created with mode 0600 at the first start.

The last key is the current one (new values are written with it); earlier
ones still decrypt older values. A key's id is the first 8 hex digits of its
SHA-256, stored in every value, so keys can rotate:
``mailer keys rotate-data-key`` appends a new key to the file and
re-encrypts every value (:func:`reseal`).

**Stored form**: text ``enc1:<key id>:<base64(nonce | ciphertext+tag)>``,
bytes ``\\0enc1:<key id><nonce><ciphertext+tag>``; the associated data binds
each value to its column (a value cannot be moved to another column).
A value without the prefix is legacy plaintext: it is read as it is, and
:func:`seal_legacy` (run at every start) encrypts it.

The keyring is process-wide (:func:`install`), set by the composition root
(:mod:`mailer.app`). Without one, values are written and read in the clear
(a bare :class:`mailer.db.Database` in tools and tests).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, Engine, LargeBinary, Text, column, func, literal, select, table, update
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from mailer.errors import ConfigError, MailerError

if TYPE_CHECKING:
    from mailer.config import Config

log = logging.getLogger(__name__)

ENV = "MAILER_DATA_KEY"
KEY_FILE_NAME = "data.key"
TEXT_PREFIX = "enc1:"
BYTES_PREFIX = b"\x00enc1:"
_KEY_BYTES = 32
_NONCE = 12
_ID_LEN = 8


class DataKeyError(MailerError):
    """A value cannot be decrypted: its key is not configured, or it was altered."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:_ID_LEN]


@dataclass
class DataKeyring:
    """Data keys by id; ``current`` encrypts, all decrypt."""

    keys: dict[str, bytes] = field(default_factory=dict)
    current: str = ""
    source: str = ""  # where the keys came from (env or a file path), for messages

    @classmethod
    def from_keys(cls, keys: Iterable[bytes], source: str = "") -> DataKeyring:
        ring = cls(source=source)
        for key in keys:
            if len(key) != _KEY_BYTES:
                raise ConfigError(f"data key in {source or 'keyring'}: expected {_KEY_BYTES} bytes, got {len(key)}")
            ring.keys[key_id(key)] = key
            ring.current = key_id(key)
        if not ring.current:
            raise ConfigError(f"no data key in {source or 'keyring'}")
        return ring

    def _aad(self, purpose: str, kid: str) -> bytes:
        return f"security-mailer/{purpose}/{kid}".encode()

    def _key(self, kid: str) -> AESGCM:
        try:
            return AESGCM(self.keys[kid])
        except KeyError:
            raise DataKeyError(f"value encrypted with data key {kid}, which is not configured ({ENV}, "
                               "[storage] data_key_file or <data_dir>/data.key)") from None

    def seal(self, data: bytes, purpose: str) -> bytes:
        kid = self.current
        nonce = os.urandom(_NONCE)
        return BYTES_PREFIX + kid.encode("ascii") + nonce + self._key(kid).encrypt(nonce, data, self._aad(purpose, kid))

    def open(self, value: bytes, purpose: str) -> bytes:
        if not value.startswith(BYTES_PREFIX):
            return value
        start = len(BYTES_PREFIX)
        kid = value[start:start + _ID_LEN].decode("ascii", errors="replace")
        nonce = value[start + _ID_LEN:start + _ID_LEN + _NONCE]
        try:
            return self._key(kid).decrypt(nonce, value[start + _ID_LEN + _NONCE:], self._aad(purpose, kid))
        except InvalidTag:
            raise DataKeyError(f"an encrypted {purpose} value does not authenticate (altered, or another column's)") from None

    def seal_text(self, text: str, purpose: str) -> str:
        sealed = self.seal(text.encode("utf-8"), purpose)
        kid = sealed[len(BYTES_PREFIX):len(BYTES_PREFIX) + _ID_LEN].decode("ascii")
        return f"{TEXT_PREFIX}{kid}:" + base64.b64encode(sealed[len(BYTES_PREFIX) + _ID_LEN:]).decode("ascii")

    def open_text(self, value: str, purpose: str) -> str:
        if not value.startswith(TEXT_PREFIX):
            return value
        kid, _, body = value[len(TEXT_PREFIX):].partition(":")
        try:
            blob = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise DataKeyError(f"an encrypted {purpose} value is not valid base64") from None
        return self.open(BYTES_PREFIX + kid.encode("ascii", errors="replace") + blob, purpose).decode("utf-8")


def value_key_id(value: str | bytes | None) -> str | None:
    """The id of the key a stored value is encrypted with; None for plaintext (legacy) values."""
    if isinstance(value, str) and value.startswith(TEXT_PREFIX):
        return value[len(TEXT_PREFIX):len(TEXT_PREFIX) + _ID_LEN]
    if isinstance(value, bytes | memoryview):
        raw = bytes(value)
        if raw.startswith(BYTES_PREFIX):
            return raw[len(BYTES_PREFIX):len(BYTES_PREFIX) + _ID_LEN].decode("ascii", errors="replace")
    return None


# --------------------------------------------------------------------------- the process-wide keyring

class _Process:
    """The keyring of this process (one attribute, so no ``global`` statement is needed)."""

    lock = threading.Lock()
    ring: DataKeyring | None = None


def install_configured(config: Config) -> None:
    """Load the data key that encrypts report content at rest for this process (``storage.data_key_file``)."""
    install(load_keyring(config.service.data_dir, config.storage.data_key_file))


def install(ring: DataKeyring | None) -> None:
    """Make *ring* the keyring of this process; keys installed before stay readable (several services, one process)."""
    with _Process.lock:
        old = _Process.ring
        if ring is None or old is None:
            _Process.ring = ring
            return
        _Process.ring = DataKeyring({**old.keys, **ring.keys}, ring.current, ring.source)


def installed() -> DataKeyring | None:
    return _Process.ring


# --------------------------------------------------------------------------- loading the data key


def _parse_keys(text: str, source: str) -> list[bytes]:
    keys: list[bytes] = []
    words = [w for line in text.splitlines() if not line.strip().startswith("#") for w in line.replace(",", " ").split()]
    for word in words:
        try:
            keys.append(base64.b64decode(word, validate=True))
        except (binascii.Error, ValueError):
            raise ConfigError(f"data key in {source}: expected base64 of {_KEY_BYTES} bytes") from None
    return keys


def new_key_line() -> str:
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def key_file_path(data_dir: Path, data_key_file: Path | None) -> Path:
    return data_key_file if data_key_file is not None else data_dir / KEY_FILE_NAME


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write("# security-mailer data key(s): the last line encrypts; keep a copy apart from the database backups\n")
        fh.write(new_key_line() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("created data key %s: back it up apart from the database (without it the reports cannot be read)", path)


def _read_key_file(path: Path) -> DataKeyring:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"storage.data_key_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"storage.data_key_file: {path} is not a key file") from None
    if mode & 0o077:
        raise ConfigError(f"storage.data_key_file: {path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
    return DataKeyring.from_keys(_parse_keys(text, str(path)), str(path))


def load_keyring(data_dir: Path, data_key_file: Path | None, environ: Mapping[str, str] | None = None) -> DataKeyring:
    """The data keys: ``MAILER_DATA_KEY``, else the key file (the default one is created at first use)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "").strip():
        return DataKeyring.from_keys(_parse_keys(environ[ENV], ENV), ENV)
    path = key_file_path(data_dir, data_key_file)
    if data_key_file is None and not path.exists():
        _create_key_file(path)
    return _read_key_file(path)


def add_key_to_file(path: Path) -> str:
    """Append a new current key to the key file (atomically, mode 0600); returns its id."""
    old = _read_key_file(path)
    line = new_key_line()
    text = path.read_text(encoding="ascii")
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    assert old.current != key_id(base64.b64decode(line))
    return key_id(base64.b64decode(line))


# --------------------------------------------------------------------------- column types


class EncryptedBytes(TypeDecorator[bytes]):
    """Bytes encrypted with the installed keyring; legacy plaintext is read as it is."""

    impl = LargeBinary
    cache_ok = True

    def __init__(self, purpose: str) -> None:
        super().__init__()
        self.purpose = purpose

    def process_bind_param(self, value: bytes | None, dialect: Dialect) -> bytes | None:
        return None if value is None else self.seal(value)

    def seal(self, value: bytes) -> bytes:
        """The value as stored (bound as plain ``LargeBinary``): sealed ahead, outside a write transaction."""
        ring = _Process.ring
        return value if ring is None else ring.seal(bytes(value), self.purpose)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        value = bytes(value)
        if not value.startswith(BYTES_PREFIX):
            return value
        return _need_ring(self.purpose).open(value, self.purpose)


class EncryptedText(TypeDecorator[str]):
    """Text encrypted with the installed keyring; legacy plaintext is read as it is."""

    impl = Text
    cache_ok = True

    def __init__(self, purpose: str) -> None:
        super().__init__()
        self.purpose = purpose

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        ring = _Process.ring
        if value is None or ring is None:
            return value
        return ring.seal_text(value, self.purpose)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None or not value.startswith(TEXT_PREFIX):
            return value
        return _need_ring(self.purpose).open_text(value, self.purpose)


class EncryptedJSON(TypeDecorator[Any]):
    """A JSON document stored as encrypted text (legacy plaintext JSON is read as it is)."""

    impl = Text
    cache_ok = True

    def __init__(self, purpose: str) -> None:
        super().__init__()
        self.purpose = purpose

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        ring = _Process.ring
        return text if ring is None else ring.seal_text(text, self.purpose)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):  # a driver that already decoded JSON (legacy column type)
            return value
        if value.startswith(TEXT_PREFIX):
            value = _need_ring(self.purpose).open_text(value, self.purpose)
        return json.loads(value)


def _need_ring(purpose: str) -> DataKeyring:
    ring = _Process.ring
    if ring is None:
        raise DataKeyError(f"an encrypted {purpose} value was read, but no data key is loaded in this process")
    return ring


# --------------------------------------------------------------------------- sealing and rotation

# Every encrypted column: (table, column, kind). The purposes are "table.column".
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("inbound_messages", "raw", "bytes"),
    ("reports", "subject", "text"),
    ("reports", "fields", "text"),
    ("report_messages", "body_text", "text"),
    ("report_messages", "meta", "text"),
    ("attachments", "filename", "text"),
    ("attachments", "data", "bytes"),
    ("events", "detail", "text"),
    ("outbox", "raw", "bytes"),
    ("scheduled_mail", "detail", "text"),
)


@dataclass
class ResealCount:
    rows: int = 0
    by_column: dict[str, int] = field(default_factory=dict)


def _reseal_column(conn: Connection, ring: DataKeyring, name: str, col: str, kind: str, *, only_plaintext: bool,
                   batch: int = 500) -> int:
    purpose = f"{name}.{col}"
    t = table(name, column("id"), column(col, LargeBinary() if kind == "bytes" else Text()))
    target = t.c[col]
    sql_type = LargeBinary() if kind == "bytes" else Text()
    # plaintext values lack the prefix; with only_plaintext=False, values under another key are taken too
    prefix: str | bytes = BYTES_PREFIX if kind == "bytes" else TEXT_PREFIX
    if not only_plaintext:
        prefix = BYTES_PREFIX + ring.current.encode("ascii") if kind == "bytes" else TEXT_PREFIX + ring.current
    condition = target.is_not(None) & (func.substr(target, 1, len(prefix)) != literal(prefix, sql_type))
    done, last = 0, 0
    while True:
        rows = conn.execute(select(t.c.id, target).where(condition, t.c.id > last).order_by(t.c.id).limit(batch)).all()
        if not rows:
            return done
        for row_id, value in rows:
            last = row_id
            if kind == "bytes":
                plain = ring.open(bytes(value), purpose)
                conn.execute(update(t).where(t.c.id == row_id).values({col: ring.seal(plain, purpose)}))
            else:
                conn.execute(update(t).where(t.c.id == row_id).values({col: ring.seal_text(ring.open_text(value, purpose),
                                                                                             purpose)}))
            done += 1


def reseal(bind: Engine | Connection, ring: DataKeyring, *, only_plaintext: bool = False,
           columns: tuple[tuple[str, str, str], ...] = COLUMNS) -> ResealCount:
    """Encrypt every value under the current key (``only_plaintext``: only legacy plaintext values)."""
    count = ResealCount()

    def run(conn: Connection) -> None:
        for name, col, kind in columns:
            n = _reseal_column(conn, ring, name, col, kind, only_plaintext=only_plaintext)
            count.by_column[f"{name}.{col}"] = n
            count.rows += n

    if isinstance(bind, Connection):
        run(bind)
    else:
        with bind.begin() as conn:
            run(conn)
    return count


def seal_legacy(bind: Engine | Connection, columns: tuple[tuple[str, str, str], ...] = COLUMNS) -> int:
    """Encrypt values stored in the clear (written before 0006 or without a keyring); the number sealed.

    A migration passes the columns that exist at its revision.
    """
    ring = _Process.ring
    if ring is None:
        return 0
    sealed = reseal(bind, ring, only_plaintext=True, columns=columns).rows
    if sealed:
        log.info("encrypted %d stored value(s) that were in the clear", sealed)
        if isinstance(bind, Engine) and bind.dialect.name == "sqlite":
            scrub_sqlite(bind)
    return sealed


def scrub_sqlite(engine: Engine) -> None:
    """Rewrite the SQLite file and empty its WAL: the freed pages of the old plaintext go with them."""
    raw = engine.raw_connection()
    try:
        raw.driver_connection.execute("VACUUM")  # type: ignore[union-attr]
        raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
    finally:
        raw.close()


def unseal_all(conn: Connection, ring: DataKeyring) -> int:
    """Decrypt every value in place (the downgrade below 0006)."""
    done = 0
    for name, col, kind in COLUMNS:
        purpose = f"{name}.{col}"
        t = table(name, column("id"), column(col, LargeBinary() if kind == "bytes" else Text()))
        for row_id, value in conn.execute(select(t.c.id, t.c[col]).where(t.c[col].is_not(None))).all():
            if value_key_id(value) is None:
                continue
            plain: str | bytes = ring.open(bytes(value), purpose) if kind == "bytes" else ring.open_text(value, purpose)
            conn.execute(update(t).where(t.c.id == row_id).values({col: plain}))
            done += 1
    return done
