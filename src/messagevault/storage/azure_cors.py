"""The Blob service's CORS rules: what lets a web page on another origin read the account.

The browser viewer reads a stream's blobs straight from Azure with the
container SAS URL the server hands out: ranged GETs of ``data`` and
``index``, a HEAD of ``index`` (its length) and a HEAD of ``checkpoint``
(its ``x-ms-meta-*`` headers). A browser makes those cross-origin requests,
and lets the page see the headers, only when the account's Blob service has a
CORS rule for the page's origin. ``viewer_rule`` is that rule.

The rules are part of the service properties, which Azure reads and writes
whole and without an ETag: ``allow_origin`` and ``remove_origin`` read them,
change the one rule and write them back, so two edits at the same moment can
lose one. They are an administrator's occasional change, made from one place.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import Literal

from azure.storage.blob import BlobServiceClient, CorsRule

from messagevault.storage.azure import azure_errors

# Azure keeps at most five CORS rules per service.
MAX_RULES = 5
METHODS = ("GET", "HEAD", "OPTIONS")
# Range for the ranged reads; x-ms-* for SDKs and pages that send x-ms-version and the like.
ALLOWED_HEADERS = ("range", "x-ms-*")
# Azure answers a prefixed entry with the matching headers' own names (x-ms-meta-commit, ...),
# which is what browsers need: they take no prefixes in Access-Control-Expose-Headers.
# content-length is safelisted anyway; named here for older browsers and for clarity.
EXPOSED_HEADERS = ("x-ms-meta-*", "x-ms-*", "content-length", "content-range", "etag")
# A browser asks again (a preflight) after this long at most.
MAX_AGE_SECONDS = 3600
# What Azure takes as one allowed origin: no commas, the list separator, and 256 characters.
MAX_ORIGIN_LENGTH = 256
_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(\.{_LABEL})*|\[[0-9a-f:.]+\]")  # a name, IPv4, or [IPv6]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One CORS rule as Azure keeps it (lists split from its comma-separated strings)."""

    origins: tuple[str, ...]
    methods: tuple[str, ...]
    allowed_headers: tuple[str, ...]
    exposed_headers: tuple[str, ...]
    max_age_seconds: int

    def as_json(self) -> dict[str, object]:
        return {
            "origins": list(self.origins),
            "methods": list(self.methods),
            "allowed_headers": list(self.allowed_headers),
            "exposed_headers": list(self.exposed_headers),
            "max_age_seconds": self.max_age_seconds,
        }


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _rule(generated: CorsRule) -> Rule:
    return Rule(
        origins=_split(generated.allowed_origins),
        methods=_split(generated.allowed_methods),
        allowed_headers=_split(generated.allowed_headers),
        exposed_headers=_split(generated.exposed_headers),
        max_age_seconds=int(generated.max_age_in_seconds or 0),
    )


def _cors_rule(rule: Rule) -> CorsRule:
    return CorsRule(
        list(rule.origins),
        list(rule.methods),
        allowed_headers=list(rule.allowed_headers),
        exposed_headers=list(rule.exposed_headers),
        max_age_in_seconds=rule.max_age_seconds,
    )


def validate_origin(origin: str) -> str:
    """``origin`` as a browser sends it (``scheme://host[:port]``, lower case), or ``*``.

    Anything else raises ``ValueError`` with a one-line reason: a rule with a
    path, a query or another scheme would never match a browser's ``Origin``.
    """
    if origin == "*":
        return origin
    shown = repr(origin)
    expected = "expected scheme://host[:port] (http or https), or * for any origin"
    if not origin:
        raise ValueError(f"an empty origin: {expected}")
    if len(origin) > MAX_ORIGIN_LENGTH:
        raise ValueError(f"origin {shown[:60]}... is longer than {MAX_ORIGIN_LENGTH} characters")
    if any(character in origin for character in ",; \t\r\n"):
        raise ValueError(f"origin {shown} has a comma, semicolon or space: give one origin")
    parts = urllib.parse.urlsplit(origin)
    scheme = parts.scheme.lower()
    if "://" not in origin or scheme not in ("http", "https"):
        raise ValueError(f"origin {shown} is not http:// or https://: {expected}")
    if parts.path or parts.query or parts.fragment or "?" in origin or "#" in origin:
        raise ValueError(
            f"origin {shown} has a path, query or fragment; a browser's Origin has none: {expected}"
        )
    if "@" in parts.netloc:
        raise ValueError(f"origin {shown} has a user name: {expected}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"origin {shown} has a bad port: {expected}") from None
    host = (parts.hostname or "").lower()
    if "[" in parts.netloc:
        host = f"[{host}]"
    if not _HOST.fullmatch(host):
        raise ValueError(f"origin {shown} has no valid host name: {expected}")
    if port == 0:
        raise ValueError(f"origin {shown} has a bad port: {expected}")
    if port == {"http": 80, "https": 443}[scheme]:
        port = None  # a browser's Origin leaves the default port out
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def viewer_rule(origin: str) -> Rule:
    """The rule the viewer needs for pages on ``origin`` (validated)."""
    return Rule(
        origins=(validate_origin(origin),),
        methods=METHODS,
        allowed_headers=ALLOWED_HEADERS,
        exposed_headers=EXPOSED_HEADERS,
        max_age_seconds=MAX_AGE_SECONDS,
    )


def cors_rules(service: BlobServiceClient) -> list[Rule]:
    """The Blob service's CORS rules, in Azure's order (the first that matches applies)."""
    with azure_errors("reading the Blob service's CORS rules"):
        properties = service.get_service_properties()
    return [_rule(generated) for generated in properties.get("cors") or []]


def _write(service: BlobServiceClient, rules: list[Rule]) -> None:
    # An empty list is sent as an empty <Cors/>, which drops every rule; None would keep them.
    with azure_errors("writing the Blob service's CORS rules"):
        service.set_service_properties(cors=[_cors_rule(rule) for rule in rules])


def allow_origin(
    service: BlobServiceClient, origin: str
) -> Literal["added", "updated", "unchanged"]:
    """Let pages on ``origin`` read the account as the viewer does; other rules stay.

    ``unchanged`` when the viewer's rule is there already, ``updated`` when
    a rule for ``origin`` alone was there but allowed something else (it is
    replaced where it stood, keeping the order), ``added`` otherwise. Raises
    ``ValueError`` for a bad origin and ``RulesFull`` when Azure's five rules
    are taken, before changing anything.
    """
    wanted = viewer_rule(origin)
    rules = cors_rules(service)
    if wanted in rules:
        return "unchanged"
    for number, rule in enumerate(rules):
        if rule.origins == wanted.origins:
            rules[number] = wanted
            _write(service, rules)
            return "updated"
    if len(rules) >= MAX_RULES:
        raise RulesFull(
            f"the Blob service has {len(rules)} CORS rules, Azure's most: remove one "
            f"(messagevault cors remove ORIGIN) before allowing {wanted.origins[0]}"
        )
    _write(service, [*rules, wanted])
    return "added"


def remove_origin(service: BlobServiceClient, origin: str) -> int:
    """Take ``origin`` out of every rule (a rule left with no origin goes): how many changed.

    0 changes nothing. ``*`` is taken literally: it removes only rules for
    any origin, not every rule.
    """
    gone = validate_origin(origin)
    rules = cors_rules(service)
    kept: list[Rule] = []
    changed = 0
    for rule in rules:
        if gone not in rule.origins:
            kept.append(rule)
            continue
        changed += 1
        others = tuple(name for name in rule.origins if name != gone)
        if others:
            kept.append(dataclasses.replace(rule, origins=others))
    if changed:
        _write(service, kept)
    return changed


class RulesFull(ValueError):
    """Azure's five CORS rules are taken."""
