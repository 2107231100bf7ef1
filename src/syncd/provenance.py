"""Who put a file on the export: the provenance the ledger and the audit log record for each published dest.

For an asset at the served commit (the *head*):

- the **introducing commit**: the commit, on any parent path, whose change gave the entry its current
  ``(dest, sha256)`` (:meth:`~syncd.gitsource.ManifestRepo.introduced`): for a pull request, the author's own
  commit inside it, not the merge; and its author (name, e-mail, date);
- the **merge commit**: the commit on the head's first-parent chain that brought the introducing commit into
  the branch (:meth:`~syncd.gitsource.ManifestRepo.merged_by`), and its committer (the merger). For an entry
  committed straight onto the branch the two are the same commit;
- the **pull/merge request** named by the merge commit's message (:func:`pull_request`);
- the **signature** verdict of the head as it was verified when the file was published.

The cost is the commits walked back from the head to where the entry first appears, with every manifest blob
parsed at most once per pass (:class:`Tracer`): proportional to what changed since, not to the history.
A failed lookup never fails a publish: the provenance then says why it is unknown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from syncd import manifest
from syncd.errors import ManifestError, SyncdError
from syncd.events import person
from syncd.gitsource import CommitInfo, ManifestRepo
from syncd.manifest import Asset

# How hosting platforms name the request in a merge commit's message.
_REQUESTS = (
    re.compile(r"^Merge pull request #(\d+)\b"),  # GitHub, Gitea/Forgejo
    re.compile(r"\bSee merge request ([\w.\-/]+)?!(\d+)\b"),  # GitLab: "See merge request group/repo!12"
    re.compile(r"^Merged PR (\d+):"),  # Azure DevOps
    re.compile(r"\(pull request #(\d+)\)"),  # Bitbucket: "Merged in branch (pull request #12)"
    re.compile(r"^[^\n]*\(#(\d+)\)$", re.MULTILINE),  # a GitHub squash merge: "Title (#12)" on line 1
)
_SQUASH = (2, 4)  # the patterns a single-parent (squash) merge commit carries
_STEPS = 5000  # commits walked back per lookup at most


def pull_request(message: str, merge: bool = True) -> tuple[int | None, str]:
    """The pull/merge request a merge commit's ``message`` names: ``(number, reference)`` such as
    ``(12, "#12")`` or ``(7, "group/repo!7")``; ``(None, "")`` when it names none. For a commit with one
    parent (``merge`` False) only the squash-merge forms count (``Title (#12)``, ``Merged PR 12:``): anyone
    can write "Merge pull request #42" into a plain commit's message."""
    first = message.split("\n", 1)[0]
    for n, pattern in enumerate(_REQUESTS):
        if not merge and n not in _SQUASH:
            continue
        text = first if n == len(_REQUESTS) - 1 else message
        found = pattern.search(text)
        if not found:
            continue
        if n == 1:
            project, number = found.group(1) or "", found.group(2)
            return int(number), f"{project}!{number}"
        return int(found.group(1)), f"#{found.group(1)}"
    return None, ""


@dataclass(frozen=True)
class Provenance:
    """What the ledger records about where a published file came from (``{}``-able: see :meth:`to_json`)."""

    introduced_commit: str = ""
    author_name: str = ""
    author_email: str = ""
    authored_at: str = ""
    merge_commit: str = ""
    merger_name: str = ""
    merger_email: str = ""
    merged_at: str = ""
    pr_number: int | None = None
    pr_ref: str = ""
    signature: str = "off"  # the head's verdict when published: "off" (not verified) or "good"
    signer: str = ""
    signer_key: str = ""
    unknown: str = ""  # why the commits could not be found (then the fields above them are empty)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @property
    def author(self) -> str:
        return person(self.author_name, self.author_email)

    @property
    def merger(self) -> str:
        return person(self.merger_name, self.merger_email)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Provenance:
        """A recorded provenance (unknown or ill-typed fields dropped: a damaged value shows as unknown)."""
        fields = cls.__dataclass_fields__
        ok: dict[str, object] = {}
        for key, value in data.items():
            if key not in fields:
                continue
            if key == "pr_number":
                if isinstance(value, int) and not isinstance(value, bool):
                    ok[key] = value
            elif isinstance(value, str):
                ok[key] = value
        return cls(**ok)  # type: ignore[arg-type]


class Tracer:
    """Provenance lookups for one pass at ``head`` (on the pass's thread), memoized: each manifest blob
    is parsed once, each commit read once, each introducing commit's merge found once."""

    def __init__(
        self, repo: ManifestRepo, head: str, signature: str = "off", signer: str = "", key: str = ""
    ):
        self.repo = repo
        self.head = head
        self.signature, self.signer, self.key = signature, signer, key
        self._entries: dict[str, frozenset[tuple[str, str]]] = {}
        self._infos: dict[str, CommitInfo] = {}
        self._merges: dict[str, str] = {}

    def trace(self, asset: Asset) -> Provenance:
        """The provenance of ``asset`` at the head (never raises)."""
        try:
            holds = self._holds(asset.manifest, asset.dest, asset.sha256)
            introduced = self.repo.introduced(self.head, asset.manifest, holds, _STEPS)
            merge = self._merges.get(introduced)
            if merge is None:
                merge = self._merges[introduced] = self.repo.merged_by(self.head, introduced, _STEPS)
            author, merger = self._info(introduced), self._info(merge)
        except SyncdError as exc:
            return self._signed(Provenance(unknown=f"git lookup failed: {exc}"[:300]))
        number, ref = pull_request(merger.message, merge=merger.parents > 1)
        found = Provenance(
            introduced_commit=introduced,
            author_name=_clean(author.author_name, 200),
            author_email=_clean(author.author_email, 200),
            authored_at=author.authored_at,
            merge_commit=merge,
            merger_name=_clean(merger.committer_name, 200),
            merger_email=_clean(merger.committer_email, 200),
            merged_at=merger.committed_at,
            pr_number=number,
            pr_ref=_clean(ref, 200),
        )
        return self._signed(found)

    def _signed(self, p: Provenance) -> Provenance:
        return replace(p, signature=self.signature, signer=self.signer, signer_key=self.key)

    def _info(self, commit: str) -> CommitInfo:
        if commit not in self._infos:
            self._infos[commit] = self.repo.commit_info(commit)
        return self._infos[commit]

    def _holds(self, path: str, dest: str, sha256: str) -> _Holds:
        return _Holds(self, path, (dest, sha256))

    def entries(self, path: str, blob: str) -> frozenset[tuple[str, str]]:
        found = self._entries.get(blob)
        if found is None:
            try:
                parsed = manifest.parse(path, self.repo.read(blob))
                found = frozenset((a.dest, a.sha256) for a in parsed)
            except (ManifestError, SyncdError):
                found = frozenset()  # an invalid older version holds no entry
            self._entries[blob] = found
        return found


class _Holds:
    """Whether a manifest blob holds one entry (a callable for ``ManifestRepo.introduced``)."""

    def __init__(self, tracer: Tracer, path: str, entry: tuple[str, str]) -> None:
        self.tracer, self.path, self.entry = tracer, path, entry

    def __call__(self, blob: str) -> bool:
        return self.entry in self.tracer.entries(self.path, blob)


def _clean(text: str, limit: int) -> str:
    """One line, bounded: names and e-mails come from commits anyone with push access writes."""
    return " ".join(text.split())[:limit]
