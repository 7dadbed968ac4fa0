"""``mailer keys``: the service's OpenPGP keyring."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mailer.cli.inbound import register_keys as register_data_key
from mailer.cli.views import Subparsers, iso, keyring, print_result
from mailer.config import Config
from mailer.errors import NotFound
from mailer.openpgp import KeyInfo, check_versions
from mailer.wellknown import fingerprint_groups, write_wkd


def key_row(info: KeyInfo, config: Config) -> dict[str, Any]:
    roles = [f"maintainer {m.address}" for m in config.maintainers if m.fingerprint == info.fingerprint]
    if info.has_secret:
        roles.append("service key")
    return {
        "fingerprint": info.fingerprint,
        "uids": list(info.uids),
        "created": iso(info.created),
        "expires": iso(info.expires),
        "revoked": info.revoked,
        "expired": info.expired,
        "can_encrypt": info.can_encrypt,
        "can_sign": info.can_sign,
        "usable": info.problem is None,
        "problem": info.problem,
        "roles": roles,
    }


def cmd_keys_list(config: Config, args: argparse.Namespace) -> int:
    rows = [key_row(k, config) for k in keyring(config).list_keys()]
    text = "\n".join(
        f"{fingerprint_groups(r['fingerprint'])}  {'usable' if r['usable'] else r['problem']:<10}  {', '.join(r['uids'])}"
        + (f"  [{'; '.join(r['roles'])}]" if r["roles"] else "")
        for r in rows
    )
    print_result(rows, args.json, text or "(no keys)")
    return 0


def cmd_keys_show(config: Config, args: argparse.Namespace) -> int:
    info = keyring(config).key_info(args.fingerprint)
    if info is None:
        raise NotFound(f"no key {args.fingerprint} in {config.gnupg_home}")
    row = key_row(info, config)
    print_result(row, args.json, "\n".join(f"{k}: {v}" for k, v in row.items()))
    return 0


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}") from None


def cmd_keys_import(config: Config, args: argparse.Namespace) -> int:
    fingerprints = keyring(config).import_public(_read(args.file))
    for fpr in fingerprints:
        print(f"imported {fpr}")
    return 0


def cmd_keys_import_secret(config: Config, args: argparse.Namespace) -> int:
    fingerprints = keyring(config).import_secret(_read(args.file), config.gnupg.secret())
    for fpr in fingerprints:
        print(f"imported secret key {fpr}")
    return 0


def cmd_keys_export(config: Config, args: argparse.Namespace) -> int:
    check_versions()
    gpg = keyring(config)
    service = config.service
    fingerprint = gpg.ensure_service_key(service.contact_name, service.contact, config.gnupg.secret())
    print(gpg.export_public(fingerprint), end="")
    return 0


def cmd_keys_wkd(config: Config, args: argparse.Namespace) -> int:
    check_versions()
    for path in write_wkd(config, keyring(config), args.dir):
        print(path)
    return 0


def register(sub: Subparsers) -> None:
    keys = sub.add_parser("keys", help="OpenPGP keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("list", help="keys in the service keyring, with usability and role")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("show", help="one key with expiry and usability")
    p.add_argument("fingerprint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_show)
    p = keys.add_parser("import", help="import public keys (maintainers, embargo list members); FILE or -")
    p.add_argument("file")
    p.set_defaults(func=cmd_keys_import)
    p = keys.add_parser("import-secret", help="use your own service key instead of the generated one")
    p.add_argument("file")
    p.set_defaults(func=cmd_keys_import_secret)
    keys.add_parser("export", help="print the service's public key (generated if missing)").set_defaults(
        func=cmd_keys_export
    )
    register_data_key(keys)
    p = keys.add_parser("wkd", help="write a Web Key Directory for the contact address under DIR (serve it as https://DOMAIN/)")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_keys_wkd)
