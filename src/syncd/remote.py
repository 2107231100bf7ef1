"""``syncd validate --remote``: does each asset match what Artifactory holds at its source?

In: the assets validate parsed (with each file's bytes, for line numbers), the assets at ``--base`` (only
new or changed assets are asked about; all without a base), and a :class:`~syncd.storage.Storage`.
Out: problem lines ``FILE:LINE: asset[N].field: …`` for a source that does not exist, a sha256 or size
that differs from Artifactory's, or a source whose sha256 Artifactory cannot tell (no storage API answer,
or no sha256 in it). The storage API is asked concurrently, at most ``workers`` requests at once, and each
source once.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from syncd.errors import FetchError
from syncd.manifest import Asset
from syncd.storage import WORKERS, Info, Storage


def changed(assets: list[Asset], base: Mapping[str, Asset] | None) -> list[Asset]:
    """The assets to ask Artifactory about: all without a base; else those whose dest is new or whose
    source, sha256 or size differ from the asset at the same dest at the base."""
    if base is None:
        return assets
    out = []
    for a in assets:
        old = base.get(a.dest)
        if old is None or (old.source, old.sha256, old.size) != (a.source, a.sha256, a.size):
            out.append(a)
    return out


def check(
    assets: list[Asset],
    lines: Mapping[str, list[dict[str, int]]],
    storage: Storage,
    *,
    workers: int = WORKERS,
) -> list[str]:
    """A problem line per asset that does not match Artifactory (in file and asset order)."""
    sources = sorted({a.source for a in assets})
    with ThreadPoolExecutor(max(1, min(workers, len(sources))), thread_name_prefix="syncd-remote") as pool:
        answers = dict(zip(sources, pool.map(lambda s: _ask(storage, s), sources), strict=True))
    problems = []
    for a in sorted(assets, key=lambda a: (a.manifest, a.index)):
        field, message = _compare(a, answers[a.source])
        if message:
            problems.append(f"{_where(a, field, lines.get(a.manifest))}: {message}")
    return problems


def _ask(storage: Storage, source: str) -> Info | str:
    """What the storage API says about ``source``, or a problem's text."""
    try:
        info = storage.info(source)
        if info is not None:
            return info
        if storage.exists(source):
            return (
                "Artifactory cannot tell its sha256: the storage API answered 404 for it, but the file "
                "downloads (is the URL Artifactory's?)"
            )
        return "does not exist in Artifactory (HTTP 404)"
    except FetchError as exc:
        return f"could not be checked: {exc}"


def _compare(a: Asset, answer: Info | str) -> tuple[str, str]:
    """``(field, problem)`` for ``a`` against Artifactory's answer; ``(…, "")`` when it matches."""
    if isinstance(answer, str):
        return "source", f"source {a.source!r} {answer}"
    if answer.folder:
        return "source", f"source {a.source!r} is a folder in Artifactory, not a file"
    if answer.sha256 is None:
        return "source", f"source {a.source!r}: Artifactory cannot tell its sha256 (no checksums.sha256)"
    if answer.sha256 != a.sha256:
        return "sha256", f"the manifest says {a.sha256}, Artifactory has {answer.sha256} for {a.source!r}"
    if answer.size != a.size:
        return "size", f"the manifest says {a.size} bytes, Artifactory has {answer.size} for {a.source!r}"
    return "", ""


def _where(a: Asset, field: str, tables: list[dict[str, int]] | None) -> str:
    """``FILE:LINE: asset[N].field`` (the line of the field, else of the table), or without the line when
    the file's tables could not be found by a line scan."""
    prefix = a.where()
    if tables is not None and a.index < len(tables):
        line = tables[a.index].get(field) or tables[a.index][""]
        prefix = f"{a.manifest}:{line}: asset[{a.index}]"
    return f"{prefix}.{field}"
