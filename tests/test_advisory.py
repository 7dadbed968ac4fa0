"""Advisory records (OSV, CVE JSON 5, text) are built only from what signed commands recorded, and validated."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
from cvelib.cve_api import CveRecord
from jsonschema import Draft202012Validator

from mailer.advisory import OSV_SCHEMA, AdvisoryError, cve5_container, osv_record, text_advisory
from mailer.app import Service
from mailer.config import Config
from mailer.models import Report
from tests.gpgtools import Home
from tests.relay import CaptureRelay
from tests.test_cli import _json, mailer
from tests.test_commands import MARA, file_report, mara, open_for, send_command, signed, svc

__all__ = ["mara", "svc"]

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
VECTOR = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"


def _config() -> Config:
    return Config.model_validate({"service": {"project": "Example"},
                                  "advisory": {"ecosystem": "PyPI", "package": "example", "repository": "https://github.com/ex/ample"}})


def _report(**values: object) -> Report:
    base: dict[str, object] = {
        "tracking_id": "SEC-2026-0007", "reporter": "rita@reporter.test", "subject": "heap overflow in parse_header()",
        "summary": "Out-of-bounds write in the header parser", "affected": "0.13.0 to 0.13.1", "fixed": "0.13.2",
        "cve": "CVE-2026-4242", "cvss_vector": VECTOR, "cvss_score": 9.8, "severity": "critical",
        "advisory_url": "https://github.com/advisories/GHSA-xxxx-yyyy-zzzz",
        "release_version": "0.13.2", "release_url": "https://github.com/ex/ample/releases/tag/0.13.2",
        "credit": "Rita R.", "credit_none": False, "published_at": None,
    }
    base.update(values)
    return Report(**base)


def test_osv_record_validates_and_keeps_the_report_private() -> None:
    """The OSV record has ranges, severity, aliases and credit, validates, and holds neither subject nor address."""
    record = osv_record(_report(), _config(), now=NOW)
    assert not list(Draft202012Validator(OSV_SCHEMA).iter_errors(record))
    assert record["aliases"] == ["CVE-2026-4242"]
    assert record["affected"][0]["ranges"][0]["events"] == [{"introduced": "0.13.0"}, {"fixed": "0.13.2"}]
    assert record["severity"] == [{"type": "CVSS_V3", "score": VECTOR}]
    assert record["credits"] == [{"name": "Rita R.", "type": "FINDER"}]
    text = json.dumps(record)
    assert "rita@reporter.test" not in text and "parse_header" not in text


def test_cve5_container_validates_against_the_cve_schema() -> None:
    """The CNA container passes cvelib's CVE JSON 5 schema; an invalid one is refused with the fields named."""
    container = cve5_container(_report(), _config())
    CveRecord.validate(container)
    assert container["metrics"][0]["cvssV3_1"]["baseSeverity"] == "CRITICAL"
    assert container["affected"][0]["versions"][0] == {
        "version": "0.13.0", "lessThan": "0.13.2", "status": "affected", "versionType": "semver"}
    with pytest.raises(AdvisoryError, match="does not validate"):
        cve5_container(_report(cvss_vector="CVSS:3.0/AV:bogus"), _config())


def test_missing_fields_are_named_and_credit_none_credits_no_one() -> None:
    """Without #summary or a fixed version nothing is written; #credit none leaves credits out."""
    with pytest.raises(AdvisoryError, match=r"summary \(#summary TEXT\)"):
        osv_record(_report(summary=None), _config(), now=NOW)
    with pytest.raises(AdvisoryError, match="fixed version"):
        text_advisory(_report(fixed=None, release_version=None), _config())
    record = osv_record(_report(credit=None, credit_none=True), _config(), now=NOW)
    assert "credits" not in record


async def test_records_for_a_report_driven_by_signed_commands(svc: Service, mara: tuple[Home, str]) -> None:
    """#summary, #credit, #cvss, #cve, #fixed, #advisory set by signed mail become valid records via the CLI."""
    home, fpr = mara
    report = await file_report(svc)
    commands = (f"#report {report.tracking_id}\n#accept\n#summary Out-of-bounds write in the header parser\n"
                f"#credit Rita R.\n#cvss {VECTOR}\n#cve CVE-2026-4242\n#affected 0.13.0 to 0.13.1\n#fixed 0.13.2\n"
                "#advisory https://github.com/advisories/GHSA-xxxx-yyyy-zzzz\n")
    await send_command(svc, signed(home, fpr, commands, msgid="<adv@p>"))
    config = svc.config.model_copy(update={"advisory": _config().advisory})
    code, out = await mailer(config, "advisory", report.tracking_id, "--format", "cve5")
    assert code == 0, out
    container = _json(out)
    assert isinstance(container, dict)
    CveRecord.validate(container)
    assert container["descriptions"][0]["value"] == "Out-of-bounds write in the header parser"
    code, out = await mailer(config, "advisory", report.tracking_id, "--format", "text")
    assert code == 0 and "CVE-2026-4242" in out and "Credit: Rita R." in out and "rita@reporter.test" not in out


async def test_advisory_without_url_drafts_the_text_for_review(
    svc: Service, relay: CaptureRelay, mara: tuple[Home, str]
) -> None:
    """`#advisory` with no URL sends the drafted text advisory to the maintainers, encrypted; incomplete is refused."""
    home, fpr = mara
    report = await file_report(svc)
    await send_command(svc, signed(home, fpr, f"#report {report.tracking_id}\n#accept\n#advisory\n", msgid="<dr0@p>"))
    refused = open_for(home, relay.handler.to(MARA)[-1].raw)
    assert "NOTHING was applied" in refused and "summary (#summary TEXT)" in refused
    commands = (f"#report {report.tracking_id}\n#accept\n#summary Out-of-bounds write in the header parser\n"
                f"#fixed 0.13.2\n#credit Rita R.\n#advisory\n")
    before = len(relay.handler.to(MARA))
    await send_command(svc, signed(home, fpr, commands, msgid="<dr1@p>"))
    texts = [open_for(home, m.raw) for m in relay.handler.to(MARA)[before:]]
    [draft] = [t for t in texts if "draft of the public advisory" in t]
    assert "Out-of-bounds write in the header parser" in draft and "Fixed in:  0.13.2" in draft and "Credit: Rita R." in draft


def official_osv_schema() -> dict[str, Any]:
    """The OSV project's own JSON schema (the osv package's data, installed by `make` without its dependencies)."""
    path = Path(str(distribution("osv").locate_file("osv/osv-schema/validation/schema.json")))
    return dict(json.loads(path.read_text(encoding="utf-8")))


def test_osv_record_validates_against_the_official_osv_schema_with_a_ghsa_id() -> None:
    """With a GitHub advisory as #advisory, the record's id is its GHSA id and the record is valid against the
    OSV project's own schema; without one the id is the tracking id, the only thing that schema refuses (its
    ids carry a home database's prefix: the publishing database assigns the final id)."""
    official = Draft202012Validator(official_osv_schema())
    record = osv_record(_report(advisory_url="https://github.com/ex/ample/security/advisories/GHSA-4v8p-9c3x-qf2m"),
                        _config(), now=NOW)
    assert record["id"] == "GHSA-4v8p-9c3x-qf2m"
    assert [e.message for e in official.iter_errors(record)] == []
    draft = osv_record(_report(advisory_url="https://example.org/advisories/7"), _config(), now=NOW)
    assert draft["id"] == "SEC-2026-0007"
    assert [list(e.absolute_path) for e in official.iter_errors(draft)] == [["id"]]
