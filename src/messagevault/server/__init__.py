"""The MessageVault HTTP server: the single writer producers talk to."""

from __future__ import annotations

from messagevault.server.app import Limits, create_app
from messagevault.server.hub import StreamHub

__all__ = ["Limits", "StreamHub", "create_app"]
