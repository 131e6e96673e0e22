"""The public surface: what ``import messagevault`` promises."""

from __future__ import annotations

import re
from pathlib import Path

import messagevault


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(messagevault).items()
        if not name.startswith("_") and not isinstance(value, type(messagevault))
    }
    public.discard("annotations")  # from __future__
    assert sorted(messagevault.__all__) == sorted(public | {"__version__"})


def test_all_names_resolve() -> None:
    for name in messagevault.__all__:
        assert getattr(messagevault, name) is not None


def test_only_the_azure_backend_imports_the_azure_sdk() -> None:
    """The seam: everything above storage/ sees no SDK type (STYLE.md, practice 3)."""
    package = Path(messagevault.__file__).parent
    allowed = {
        package / "storage" / name
        for name in (
            "azure.py",
            "azure_lease.py",
            "azure_leases.py",
            "azure_documents.py",
            "azure_cors.py",
        )
    }
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path not in allowed and re.search(r"^\s*(from|import) azure\b", path.read_text(), re.M)
    ]
    assert offenders == []
