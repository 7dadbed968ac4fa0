"""Reading the TOML file and the environment into a validated :class:`Config`; unknown variables are refused."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mailer.config.model import Config
from mailer.errors import ConfigError

_SECTIONS = {name: field.annotation for name, field in Config.model_fields.items() if name != "maintainers"}


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``MAILER_<SECTION>_<KEY>`` variables on top of the file's values."""
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for section, model in _SECTIONS.items():
        for key in model.model_fields:  # type: ignore[union-attr]
            env = f"MAILER_{section}_{key}".upper()
            if env in environ:
                merged.setdefault(section, {})[key] = environ[env]
    return merged


def _describe(error: ValidationError, environ: Mapping[str, str]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        env = "MAILER_" + "_".join(str(p) for p in item["loc"]).upper()
        origin = f" (from {env})" if env in environ else ""
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}{origin}: {message}")
    return "invalid configuration: " + "; ".join(lines)


#: variables besides MAILER_<SECTION>_<KEY> that are ours and legitimate
_OTHER_VARIABLES = frozenset({
    "MAILER_CONFIG", "MAILER_MAINTAINERS", "MAILER_MAINTAINERS_FILE", "MAILER_DATA_KEY", "MAILER_BASE_IMAGE",
    "MAILER_SKIP_MIGRATE",  # docker/entrypoint
})
_OTHER_PREFIXES = ("MAILER_TEST_",)


def known_variables() -> set[str]:
    """Every MAILER_* variable the service reads."""
    names = {f"MAILER_{section}_{key}".upper() for section, model in _SECTIONS.items()
             for key in model.model_fields}  # type: ignore[union-attr]
    return names | _OTHER_VARIABLES


def check_environment(environ: Mapping[str, str]) -> None:
    """:raises ConfigError: for a MAILER_* variable nobody reads (a typo), naming the closest known one."""
    import difflib

    known = known_variables()
    for name in sorted(environ):
        if not name.startswith("MAILER_") or name in known or name.startswith(_OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}?" if close else " (see config/mailer.example.toml)"
        raise ConfigError(f"unknown environment variable {name}{hint}")


def _maintainers_from_env(environ: Mapping[str, str]) -> list[Any] | None:
    """``MAILER_MAINTAINERS`` (a JSON array) or ``MAILER_MAINTAINERS_FILE`` (JSON array or TOML ``[[maintainers]]``)."""
    import json

    if "MAILER_MAINTAINERS" in environ:
        text, origin = environ["MAILER_MAINTAINERS"], "MAILER_MAINTAINERS"
    elif "MAILER_MAINTAINERS_FILE" in environ:
        path = Path(environ["MAILER_MAINTAINERS_FILE"])
        origin = f"MAILER_MAINTAINERS_FILE {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read: {exc.strerror or exc}") from None
        if not text.lstrip().startswith("[") or text.lstrip().startswith("[["):
            try:
                return list(tomllib.loads(text).get("maintainers", []))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    else:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{origin}: expected a JSON array of {{name, address, fingerprint}} objects: {exc}") from None
    if not isinstance(value, list):
        raise ConfigError(f"{origin}: expected a JSON array of {{name, address, fingerprint}} objects")
    return value


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any) and the environment into a validated Config.

    :raises ConfigError: naming the key and the expected form.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("MAILER_CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    check_environment(environ)
    merged = _env_overrides(raw, environ)
    maintainers = _maintainers_from_env(environ)
    if maintainers is not None:
        merged["maintainers"] = maintainers
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, environ)) from None


# -- checked at start -----------------------------------------------------------------------------
