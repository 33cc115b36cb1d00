"""telecom.ext: adapters that plug telecom into Discord libraries' main-gateway connections.

What it owns: one module per library (``discordpy``: discord.py's ``VoiceProtocol``; ``hikari``: hikari's
``VoiceConnection``). Each imports its library, so import the module you need; the core of telecom
never imports them (install with the ``discordpy`` / ``hikari`` extras). See docs/adapters.md.

What it must not do: implement voice itself — every adapter drives a :class:`telecom.Client`.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_ready(client: Any, timeout: float) -> None:
    """``await`` until ``client`` can send audio, from any loop, leaving nothing behind on a timeout.

    Runs :meth:`telecom.Client.wait_ready` in a worker thread rather than ``await client.ready()``:
    a timed-out ``ready()`` leaves its future registered on the client, which later resolves it on
    the caller's loop — by then possibly closed (an adapter's failed connect is often the last thing
    a short-lived loop does).
    """
    await asyncio.to_thread(client.wait_ready, timeout)
