"""Advisory records from what the commands recorded: OSV, a CVE JSON 5 CNA container, and plain text.

Only what maintainers set by signed commands goes in: ``#summary`` (never
the report's own text), ``#affected``/``#fixed``/``#release`` (as ranges),
``#severity``/``#cvss``, ``#cve``, ``#advisory`` and the release URL, and the
reporter's credit only when ``#credit NAME`` was given — never their address.

Every record is validated before it is returned: CVE JSON 5 against the CNA
container schema that ``cvelib`` ships, OSV against :data:`OSV_SCHEMA` (the
required structure of the OSV 1.6 specification). A record that does not
validate is an :class:`AdvisoryError` listing the fields.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from mailer.config import Config
from mailer.errors import MailerError
from mailer.models import Report

_VERSION = re.compile(r"\bv?(\d+(?:\.\d+){0,3}(?:[-+~][\w.]+)?)\b")
NIL_ORG = "00000000-0000-4000-8000-000000000000"

OSV_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "id", "modified"],
    "properties": {
        "schema_version": {"type": "string", "pattern": r"^1\.\d+\.\d+$"},
        "id": {"type": "string", "minLength": 1},
        "modified": {"type": "string", "format": "date-time", "pattern": r"Z$"},
        "published": {"type": "string", "pattern": r"Z$"},
        "aliases": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string", "maxLength": 500},
        "details": {"type": "string"},
        "severity": {"type": "array", "items": {
            "type": "object", "required": ["type", "score"],
            "properties": {"type": {"enum": ["CVSS_V2", "CVSS_V3", "CVSS_V4", "Ubuntu"]}, "score": {"type": "string"}}}},
        "affected": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "package": {"type": "object", "required": ["ecosystem", "name"],
                            "properties": {"ecosystem": {"type": "string", "minLength": 1},
                                           "name": {"type": "string", "minLength": 1}}},
                "ranges": {"type": "array", "items": {
                    "type": "object", "required": ["type", "events"],
                    "properties": {
                        "type": {"enum": ["GIT", "SEMVER", "ECOSYSTEM"]},
                        "repo": {"type": "string"},
                        "events": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "minProperties": 1, "maxProperties": 1,
                            "properties": {k: {"type": "string"} for k in ("introduced", "fixed", "last_affected", "limit")},
                            "additionalProperties": False}}}}},
                "versions": {"type": "array", "items": {"type": "string"}}}}},
        "references": {"type": "array", "items": {
            "type": "object", "required": ["type", "url"],
            "properties": {"type": {"enum": ["ADVISORY", "ARTICLE", "DETECTION", "DISCUSSION", "REPORT", "FIX",
                                             "INTRODUCED", "PACKAGE", "EVIDENCE", "WEB"]},
                           "url": {"type": "string", "pattern": "^https?://"}}}},
        "credits": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "contact": {"type": "array", "items": {"type": "string"}},
                           "type": {"enum": ["FINDER", "REPORTER", "ANALYST", "COORDINATOR", "REMEDIATION_DEVELOPER",
                                             "REMEDIATION_REVIEWER", "REMEDIATION_VERIFIER", "TOOL", "SPONSOR",
                                             "OTHER"]}}}},
    },
    "additionalProperties": False,
}


class AdvisoryError(MailerError):
    """An advisory record cannot be written: what is missing or invalid, field by field."""


def _z(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _introduced(report: Report) -> str:
    match = _VERSION.search(report.affected or "")
    return match.group(1) if match else "0"


def _fixed(report: Report) -> str | None:
    return report.fixed or report.release_version


def _needs(report: Report, config: Config, *, osv: bool) -> list[str]:
    missing = []
    if not report.summary:
        missing.append("summary (#summary TEXT)")
    if not _fixed(report):
        missing.append("fixed version (#fixed VERSION or #release VERSION URL)")
    if osv and not (config.advisory.ecosystem and config.advisory.package):
        missing.append("[advisory] ecosystem and package in the configuration")
    return missing


def _references(report: Report, config: Config) -> list[tuple[str, str]]:
    refs = [("ADVISORY", report.advisory_url)] if report.advisory_url else []
    if report.release_url:
        refs.append(("PACKAGE" if config.advisory.ecosystem else "WEB", report.release_url))
    if config.advisory.repository:
        refs.append(("PACKAGE", config.advisory.repository))
    return [(kind, url) for kind, url in refs if url]


_GHSA = re.compile(r"\bGHSA(?:-[23456789cfghjmpqrvwx]{4}){3}\b")


def osv_id(report: Report) -> str:
    """The record's id: the GitHub advisory's GHSA id when ``#advisory`` names one (a home database the
    OSV schema knows), else the tracking id (a draft id the publishing database replaces)."""
    found = _GHSA.search(report.advisory_url or "")
    return found.group(0) if found else report.tracking_id


def osv_record(report: Report, config: Config, *, now: datetime) -> dict[str, Any]:
    """The OSV record; :raises AdvisoryError: when a required field is missing or the record is invalid."""
    missing = _needs(report, config, osv=True)
    if missing:
        raise AdvisoryError("cannot write the OSV record, missing: " + "; ".join(missing))
    record: dict[str, Any] = {
        "schema_version": "1.6.0",
        "id": osv_id(report),
        "modified": _z(now),
        "summary": report.summary,
        "details": report.summary,
        "affected": [{
            "package": {"ecosystem": config.advisory.ecosystem, "name": config.advisory.package},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": _introduced(report)}, {"fixed": _fixed(report)}]}],
        }],
        "references": [{"type": kind, "url": url} for kind, url in _references(report, config)],
    }
    if report.published_at:
        record["published"] = _z(report.published_at)
    if report.cve:
        record["aliases"] = [report.cve]
    if report.cvss_vector:
        kind = "CVSS_V4" if report.cvss_vector.startswith("CVSS:4.0/") else "CVSS_V3"
        record["severity"] = [{"type": kind, "score": report.cvss_vector}]
    if report.credit and not report.credit_none:
        record["credits"] = [{"name": report.credit, "type": "FINDER"}]
    from jsonschema import Draft202012Validator  # imported when used: 3 MB in every process otherwise

    problems = [f"{'/'.join(str(p) for p in e.absolute_path) or '(record)'}: {e.message}"
                for e in Draft202012Validator(OSV_SCHEMA).iter_errors(record)]
    if problems:
        raise AdvisoryError("the OSV record does not validate: " + "; ".join(problems))
    return record


def _metrics(report: Report) -> list[dict[str, Any]]:
    if not report.cvss_vector or report.cvss_score is None:
        return []
    rating = ("CRITICAL" if report.cvss_score >= 9 else "HIGH" if report.cvss_score >= 7
              else "MEDIUM" if report.cvss_score >= 4 else "LOW" if report.cvss_score > 0 else "NONE")
    if report.cvss_vector.startswith("CVSS:4.0/"):
        return [{"cvssV4_0": {"version": "4.0", "vectorString": report.cvss_vector, "baseScore": report.cvss_score,
                              "baseSeverity": rating}}]
    version = report.cvss_vector.split("/", 1)[0].split(":", 1)[1]
    key = "cvssV3_1" if version == "3.1" else "cvssV3_0"
    return [{key: {"version": version, "vectorString": report.cvss_vector, "baseScore": report.cvss_score,
                   "baseSeverity": rating}}]


def cve5_container(report: Report, config: Config) -> dict[str, Any]:
    """The CVE JSON 5 CNA container (what ``cve publish`` submits); validated against cvelib's schema."""
    missing = _needs(report, config, osv=False)
    if not _references(report, config):
        missing.append("a reference (#advisory URL or #release VERSION URL)")
    if missing:
        raise AdvisoryError("cannot write the CVE record, missing: " + "; ".join(missing))
    fixed = _fixed(report)
    container: dict[str, Any] = {
        "providerMetadata": {"orgId": config.advisory.cve_org_id or NIL_ORG},
        "title": report.summary,
        "descriptions": [{"lang": "en", "value": report.summary}],
        "affected": [{
            "vendor": config.advisory.vendor or config.project,
            "product": config.advisory.package or config.project,
            "versions": [{"version": _introduced(report), "lessThan": fixed, "status": "affected", "versionType": "semver"}],
            "defaultStatus": "unaffected",
        }],
        "references": [{"url": url} for _, url in _references(report, config)],
    }
    if config.advisory.repository:
        container["affected"][0]["repo"] = config.advisory.repository
    metrics = _metrics(report)
    if metrics:
        container["metrics"] = metrics
    if report.credit and not report.credit_none:
        container["credits"] = [{"lang": "en", "value": report.credit, "type": "finder"}]
    from cvelib.cve_api import CveRecord, CveRecordValidationError  # imported when used: 7 MB otherwise

    try:
        CveRecord.validate(container)
    except CveRecordValidationError as exc:
        errors = getattr(exc, "errors", None) or [str(exc)]
        raise AdvisoryError("the CVE record does not validate: " + "; ".join(str(e) for e in errors)) from None
    return container


def text_advisory(report: Report, config: Config) -> str:
    """A plain-text advisory for review (what the maintainers would publish)."""
    missing = _needs(report, config, osv=False)
    if missing:
        raise AdvisoryError("cannot write the advisory, missing: " + "; ".join(missing))
    lines = [
        f"{config.project} security advisory {report.cve or report.tracking_id}",
        "",
        f"Summary:   {report.summary}",
        f"Severity:  {report.severity or '-'}" + (f" (CVSS {report.cvss_score} {report.cvss_vector})" if report.cvss_vector else ""),
        f"Affected:  {report.affected or 'versions before ' + str(_fixed(report))}",
        f"Fixed in:  {_fixed(report)}",
    ]
    if report.cve:
        lines.append(f"CVE:       {report.cve}")
    for _, url in _references(report, config):
        lines.append(f"Reference: {url}")
    if report.credit and not report.credit_none:
        lines += ["", f"Credit: {report.credit}"]
    return "\n".join(lines) + "\n"
