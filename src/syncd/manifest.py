"""Parse and validate manifest files (pure: bytes in, assets or a :class:`ManifestError` out).

A manifest is a TOML file with one or more ``[[asset]]`` tables::

    [[asset]]
    source = "ml-datasets/imagenet/v2/train-000.tar"   # path under [artifactory].url
    sha256 = "9f86d0…"                                   # 64 lowercase hex
    size = 1048576                                      # bytes, exact
    dest = "datasets/imagenet/v2/train-000.tar"         # path under [export].root
    description = "…"                                   # optional
    replace = true                                      # optional: allow changing a published dest

Problems read ``FILE:LINE: message`` when TOML gives a line, else ``FILE: asset[N].field: message``.
"""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from syncd.errors import ManifestError

RESERVED_PREFIX = ".syncd"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)$")


def _common_path_checks(value: str) -> list[str]:
    if not value:
        raise ValueError("must not be empty")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if "\\" in value:
        raise ValueError("must use '/' as separator, not '\\'")
    if value.startswith("/"):
        raise ValueError("must be a relative path, not an absolute one")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError("must not contain '..'")
    if any(p in ("", ".") for p in parts):
        raise ValueError("must not contain empty or '.' path components (no '//', './' or '/' at the end)")
    if len(value.encode()) > 4096 or any(len(p.encode()) > 255 for p in parts):
        raise ValueError("is too long for a file system path")
    return parts


def check_source(value: str) -> str:
    """Validate a ``source``: a plain path under the Artifactory URL, never a URL of its own."""
    if _SCHEME.match(value) or value.startswith("//"):
        raise ValueError("must be a path under [artifactory].url, without a scheme or host")
    if "?" in value or "#" in value:
        raise ValueError("must not contain '?' or '#'")
    _common_path_checks(value)
    return value


def check_dest(value: str) -> str:
    """Validate a ``dest``: a relative path inside the export, outside syncd's reserved names."""
    parts = _common_path_checks(value)
    if parts[0].startswith(RESERVED_PREFIX):
        raise ValueError(f"must not start with '{RESERVED_PREFIX}' (reserved for syncd's own use)")
    return value


class _AssetModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    source: Annotated[str, AfterValidator(check_source)]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**63 - 1)
    dest: Annotated[str, AfterValidator(check_dest)]
    description: str = ""
    replace: bool = False


@dataclass(frozen=True)
class Asset:
    """One validated asset: what to fetch, what it must hash to, and where it lands."""

    source: str
    sha256: str
    size: int
    dest: str
    manifest: str
    index: int
    description: str = ""
    replace: bool = False

    def where(self) -> str:
        """``FILE: asset[N]``, for messages."""
        return f"{self.manifest}: asset[{self.index}]"


def parse(file: str, data: bytes) -> list[Asset]:
    """Parse one manifest file's bytes; return its assets or raise :class:`ManifestError`."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(file, [f"{file}: not UTF-8 text (byte {exc.start})"]) from None
    except RecursionError:
        raise ManifestError(file, [f"{file}: invalid TOML: nested too deeply"]) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_LINE.search(msg)
        if m:
            text = msg[: m.start()].rstrip()
            raise ManifestError(file, [f"{file}:{m.group(1)}: invalid TOML: {text}"]) from None
        raise ManifestError(file, [f"{file}: invalid TOML: {msg}"]) from None
    problems = [
        f"{file}: {key}: unknown top-level key (only [[asset]] tables)" for key in doc if key != "asset"
    ]
    tables = doc.get("asset")
    if tables is None:
        problems.append(f"{file}: no [[asset]] table")
        raise ManifestError(file, problems)
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append(f"{file}: asset: must be written as [[asset]] tables")
        raise ManifestError(file, problems)
    assets = []
    for n, table in enumerate(tables):
        asset, errs = _asset(file, n, table)
        problems += errs
        if asset is not None:
            assets.append(asset)
    for dest, dups in duplicates(assets).items():
        numbers = ", ".join(f"asset[{a.index}]" for a in dups)
        problems.append(f"{file}: {numbers}.dest: {dest!r} appears more than once")
    if problems:
        raise ManifestError(file, problems)
    return assets


def _asset(file: str, n: int, table: dict[str, Any]) -> tuple[Asset | None, list[str]]:
    try:
        m = _AssetModel.model_validate(table)
    except ValidationError as exc:
        return None, [_problem(file, n, err) for err in exc.errors(include_url=False)]
    return Asset(
        source=m.source,
        sha256=m.sha256,
        size=m.size,
        dest=m.dest,
        manifest=file,
        index=n,
        description=m.description,
        replace=m.replace,
    ), []


def _problem(file: str, n: int, err: Any) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "?"
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        msg = "required field is missing"
    elif kind == "extra_forbidden":
        msg = "unknown field (allowed: source, sha256, size, dest, description, replace)"
    elif field == "sha256" and kind in ("string_pattern_mismatch", "string_type"):
        msg = "must be 64 lowercase hex characters (the output of sha256sum)"
    elif field == "size" and kind in ("int_type", "greater_than_equal"):
        msg = "must be a non-negative whole number of bytes"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    return f"{file}: asset[{n}].{field}: {msg}"


def duplicates(assets: Iterable[Asset]) -> dict[str, list[Asset]]:
    """The ``dest`` values claimed by more than one asset, with the assets that claim them."""
    by_dest: dict[str, list[Asset]] = defaultdict(list)
    for a in assets:
        by_dest[a.dest].append(a)
    return {d: v for d, v in by_dest.items() if len(v) > 1}
