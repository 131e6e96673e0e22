"""``messagevault stress``: load a server, watch it, and check every message it stored.

Modules, one concept each: ``workload`` (the plan and the checkable
messages), ``stats`` (HDR histograms and the per-second series), ``driver``
(producers and consumers), ``verify`` (the read-back), ``progress`` (the
live line), ``report`` (table, JSON, HTML/PNG) and ``embedded`` (a
``messagevault serve`` child process on a temporary folder). The command
itself is ``messagevault.cli_stress``; nothing below the CLI imports this.
This file imports nothing, so that the CLI can read ``workload``'s bounds
without loading the HTTP client.
"""
