"""Provenance: the pull/merge request named in a merge message (pure), and the ledger's provenance of
published files over a real git history (several commits between polls, --no-ff pull request merges)."""

from __future__ import annotations

import pytest

from syncd.provenance import Provenance, pull_request


@pytest.mark.unit
@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Merge pull request #42 from alice/weights\n\nAdd weights", (42, "#42")),  # GitHub
        (
            "Merge branch 'weights' into 'main'\n\nAdd weights\n\nSee merge request ml/assets!7",
            (7, "ml/assets!7"),
        ),
        ("Merge branch 'x' into 'main'\n\nSee merge request !12", (12, "!12")),  # GitLab, no project
        ("Merged PR 1234: add weights", (1234, "#1234")),  # Azure DevOps
        ("Merged in feature/x (pull request #5)\n\nAdd weights", (5, "#5")),  # Bitbucket
        ("Add weights for llama (#77)\n\n* add\n* fix", (77, "#77")),  # a GitHub squash merge
        ("Add weights", (None, "")),
        ("Fix #12 in the body\n\nrefs #13", (None, "")),  # an issue reference is not a request
        ("Merge branch 'main' of host:repo", (None, "")),  # a local merge names none
        ("", (None, "")),
    ],
)
def test_pull_request_is_read_from_the_merge_message(message: str, expected: tuple[int | None, str]) -> None:
    assert pull_request(message) == expected


@pytest.mark.unit
@pytest.mark.unit
@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Merge pull request #42 from eve/x", (None, "")),  # anyone can write this in a plain commit
        ("x\n\nSee merge request ml/assets!7", (None, "")),
        ("Add weights (#77)", (77, "#77")),  # a squash merge has one parent
        ("Merged PR 12: add weights", (12, "#12")),
    ],
)
def test_a_single_parent_commit_names_a_request_only_as_a_squash_merge(
    message: str, expected: tuple[int | None, str]
) -> None:
    assert pull_request(message, merge=False) == expected


def test_recorded_provenance_round_trips_and_ill_typed_fields_are_dropped() -> None:
    p = Provenance(
        introduced_commit="a" * 40, author_name="Alice", author_email="a@x", pr_number=3, pr_ref="#3"
    )
    assert Provenance.from_json(p.to_json()) == p
    odd = Provenance.from_json({"pr_number": "3", "author_name": 5, "unknown_key": "x", "merger_name": "Bob"})
    assert odd == Provenance(merger_name="Bob")
    assert p.author == "Alice <a@x>" and Provenance().author == ""
