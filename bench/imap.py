"""IMAP catch-up benchmark: the poller vs a plain aioimaplib fetch loop on the same Dovecot.

Starts a private Dovecot (tests/dovecot.py) and a SQLite database in a temporary
directory, appends N messages (default 1000) over one connection, then times

- ``plain_fetch``: connect, LOGIN, SELECT, ``UID SEARCH ALL`` and ``UID FETCH
  (BODY.PEEK[])`` in batches of 100: the floor any IMAP client pays (read-only);
- ``service``: :class:`inbound.imap.ImapPoller` from connect until all N are
  durably stored (a commit per group of fetched messages) and moved to the processed
  folder (a UID MOVE per group, each after the group's commit).

Only intake is timed (the pipeline runs later, off the IMAP path). The plain loop keeps its
100 messages per FETCH; the service fetches 25 per command (inbound.imap_client.FETCH_MAX_MESSAGES),
which aioimaplib parses faster per message (its cost per command grows with the square of the count).

    .venv/bin/python bench/imap.py [--messages N] [--json]

``--json`` prints one object: ``service_msgs_per_s``, ``plain_fetch_msgs_per_s``,
``ratio_vs_plain_fetch`` (service / plain; 1.0 would mean storing is free) and ``messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import aioimaplib

from inbound.imap import ImapPoller
from inbound.imap_client import fetch_literals, search_uids, uid_set
from mailer.config import ImapConfig
from mailer.db import Database, upgrade
from tests.dovecot import Dovecot, append_messages, make_message, start_dovecot

BATCH = 100


async def plain_fetch(server: Dovecot, expected: int) -> float:
    """Seconds for a bare aioimaplib client to download every message once."""
    started = time.perf_counter()
    client = aioimaplib.IMAP4("127.0.0.1", server.port, timeout=60)
    await client.wait_hello_from_server()
    await client.login(server.user, server.password)
    await client.select("INBOX")
    uids = search_uids((await client.uid_search("ALL", charset=None)).lines)
    fetched = 0
    for start in range(0, len(uids), BATCH):
        response = await client.uid("fetch", uid_set(uids[start:start + BATCH]), "(UID BODY.PEEK[])")
        fetched += len(fetch_literals(response.lines))
    await client.logout()
    elapsed = time.perf_counter() - started
    if fetched != expected:
        raise SystemExit(f"plain fetch got {fetched} messages, expected {expected}")
    return elapsed


async def service_catch_up(server: Dovecot, db: Database, expected: int) -> float:
    """Seconds for the poller to store and move every message."""
    config = ImapConfig(
        enabled=True, host="127.0.0.1", port=server.port, username=server.user, password=server.password,
        security="none", poll_seconds=60, idle_seconds=60,
    )
    poller = ImapPoller(config, db)
    started = time.perf_counter()
    task = asyncio.create_task(poller.run())
    try:
        while poller.counters.moved < expected:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        return time.perf_counter() - started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def main(messages: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-imap-") as tmp:
        server = start_dovecot(Path(tmp) / "dovecot")
        try:
            await asyncio.to_thread(append_messages, server, [make_message(i, tag="bench") for i in range(messages)])
            url = f"sqlite:///{Path(tmp) / 'mailer.db'}"
            await asyncio.to_thread(upgrade, url)
            db = Database(url)
            plain = await plain_fetch(server, messages)
            service = await service_catch_up(server, db, messages)
            db.dispose()
        finally:
            server.cleanup()
    return {
        "messages": messages,
        "service_msgs_per_s": round(messages / service, 1),
        "plain_fetch_msgs_per_s": round(messages / plain, 1),
        "ratio_vs_plain_fetch": round(plain / service, 3),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = asyncio.run(main(args.messages))
    if args.json:
        print(json.dumps(result))
        return
    print(f"messages:          {result['messages']}")
    print(f"service catch-up:  {result['service_msgs_per_s']:.1f} msgs/s (stored + moved)")
    print(f"plain fetch loop:  {result['plain_fetch_msgs_per_s']:.1f} msgs/s (download only)")
    print(f"ratio vs plain:    {result['ratio_vs_plain_fetch']:.3f}")


if __name__ == "__main__":
    cli()
