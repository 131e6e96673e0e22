"""The public surface: what ``import messagevault`` promises."""

from __future__ import annotations

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
