"""The old home of ``message_record`` and ``iso_time``, which now live in ``wire``.

Importing them from here still works.
"""

from __future__ import annotations

from messagevault.wire import iso_time as iso_time  # noqa: PLC0414
from messagevault.wire import message_record as message_record  # noqa: PLC0414
