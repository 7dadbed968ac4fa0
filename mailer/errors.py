"""The service's one error tree. Third-party errors are translated at the boundary."""

from __future__ import annotations


class MailerError(Exception):
    """Base of every error the service raises on purpose."""


class ConfigError(MailerError):
    """The configuration is missing or invalid; the message names the key."""


class DatabaseNotMigrated(MailerError):
    """The database schema is not at the revision this code expects."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database is at revision {current or 'none (empty)'}, this version needs {head}: "
            "run `mailer db upgrade` first"
        )


class NotFound(MailerError):
    """A report, message or outbox row named by the user does not exist."""


class StepError(MailerError):
    """A processing step failed; carries the step name for the failed-message record."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"{step}: {type(cause).__name__}: {cause}")


class DeliveryError(MailerError):
    """Outgoing delivery failed; ``temporary`` says whether a retry may succeed."""

    def __init__(self, message: str, *, temporary: bool, code: int | None = None) -> None:
        self.temporary = temporary
        self.code = code
        super().__init__(message)
