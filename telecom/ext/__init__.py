"""telecom.ext: adapters that plug telecom into Discord libraries' main-gateway connections.

What it owns: one module per library (``discordpy``: discord.py's ``VoiceProtocol``; ``hikari``: hikari's
``VoiceConnection``). Each imports its library, so import the module you need; the core of telecom
never imports them (install with the ``discordpy`` / ``hikari`` extras). See docs/adapters.md.

What it must not do: implement voice itself — every adapter drives a :class:`telecom.Client`.
"""
