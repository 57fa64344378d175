"""Models on the Hugging Face Hub, named wherever a checkpoint path goes.

``org/name`` and ``org/name@revision`` (a branch, a tag or a commit hash) name a model repository
on the Hub; ``hf://org/name[@revision]`` says so explicitly, and is the only way to name a
repository without an organisation (``hf://gpt2``). The rules, in order:

* ``hf://...`` is always the Hub;
* a file or folder that exists as written is always local (a folder ``org/name`` beside you wins
  over the repository ``org/name``; write ``hf://org/name`` to reach the Hub instead);
* otherwise text of the form ``org/name`` or ``org/name@revision`` (two parts, letters, digits,
  ``-``, ``_`` and ``.``) is the Hub; anything else stays a path (and fails as a missing one).

:func:`resolve_hub` fetches the repository's top-level weights, config and tokenizer files with
``huggingface_hub.snapshot_download`` into the Hub's own cache (``HF_HUB_CACHE``/``HF_HOME``), so a
second use downloads nothing; with ``HF_HUB_OFFLINE=1`` it reads the cache only. It returns the
snapshot folder and the commit hash the revision resolved to, which lineages record (never the
folder: where a cache lies differs between machines).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HubError, MissingDependencyError

PREFIX = "hf://"
"""Marks a Hub reference explicitly: ``hf://org/name@v1``."""
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REVISION = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}"
_REFERENCE = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>{_REVISION}))?")
_EXPLICIT = re.compile(rf"(?P<repo>(?:{_PART}/)?{_PART})(?:@(?P<revision>{_REVISION}))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")

WEIGHT_PATTERNS = (
    ("*.safetensors", "*.safetensors.index.json"),
    ("*.bin", "*.bin.index.json"),
    ("*.pt", "*.pth", "*.ckpt"),
)
"""The weights fetched from a repository's top level, in order of preference: only the first kind
the repository holds (many hold both safetensors and ``.bin`` copies; one is enough)."""
SIDE_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py")
"""Beside the weights: config, generation config, tokenizer files (``tokenizer.json``,
``vocab.txt``, ``merges.txt``, SentencePiece ``*.model``), and the remote code a config names."""
_INSTALL = "pip install 'terge[llm]'"


@dataclass(frozen=True)
class HubReference:
    """A model repository on the Hub and the revision asked for (``None``: its default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + ("" if self.revision is None else f"@{self.revision}")


@dataclass(frozen=True)
class HubSnapshot:
    """A Hub reference resolved: the commit it names, and the cached folder of its files."""

    repo_id: str
    revision: str | None
    """The revision asked for (``None``: the default branch)."""
    commit: str
    """The commit hash it resolved to (40 hex digits)."""
    folder: Path
    """The snapshot in the local cache (machine-specific: never recorded in a lineage)."""

    @property
    def pinned(self) -> str:
        """``org/name@<commit>``: the same weights on any machine, as the lineage records them."""
        return f"{self.repo_id}@{self.commit}"


def hub_reference(model: object) -> HubReference | None:
    """``model`` as a Hub reference, or ``None`` when it is a local path (see the module's rules).

    A malformed ``hf://`` reference is an error; other text that does not look like ``org/name``
    is simply a path.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        return None
    collapsed = model.startswith("hf:/") and not model.startswith(PREFIX)
    if collapsed and not Path(model).exists():  # Path("hf://x") collapses the slashes: "hf:/x"
        model = PREFIX + model[len("hf:/") :]
    if model.startswith(PREFIX):
        found = _EXPLICIT.fullmatch(model[len(PREFIX) :])
        if found is None or not _valid_name(found["repo"], found["revision"]):
            raise HubError(
                f"{model!r} is not a Hub reference; write hf://org/name or hf://org/name@revision "
                "(a branch, tag or commit hash), e.g. hf://openai-community/gpt2@main."
            )
        return HubReference(found["repo"], found["revision"])
    found = _REFERENCE.fullmatch(model)
    if found is None or Path(model).expanduser().exists():
        return None
    if not _valid_name(found["repo"], found["revision"]):
        return None
    return HubReference(found["repo"], found["revision"])


def hub_shaped(text: str) -> bool:
    """Whether ``text`` has a Hub reference's form (``hf://...``, ``org/name[@revision]``),
    whether or not a local file of that name exists."""
    if text.startswith(PREFIX):
        return True
    found = _REFERENCE.fullmatch(text)
    return found is not None and _valid_name(found["repo"], found["revision"])


def _valid_name(repo_id: str, revision: str | None = None) -> bool:
    """The Hub's own rules beyond the characters: no ``--`` or ``..`` in a name, and no name
    ending in ``.git``; and no ``..`` or empty part in a revision (it names a file under the
    cache's ``refs/``)."""
    parts = [] if revision is None else revision.split("/")
    return (
        "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith(".git")
        and all(part and part != ".." for part in parts)
    )


def resolve_hub(reference: str | HubReference) -> HubSnapshot:
    """Fetch (or, offline, find in the cache) a Hub model's files; its folder and commit.

    Only the repository's top-level files are fetched: the first kind of weights it holds (see
    :data:`WEIGHT_PATTERNS`) and the config and tokenizer files. Files already cached are not
    downloaded again. Errors say what was asked, what is cached and how to get it.
    """
    if not isinstance(reference, HubReference):
        parsed = hub_reference(reference if reference.startswith(PREFIX) else PREFIX + reference)
        assert parsed is not None  # hf:// text is a reference or raised
        reference = parsed
    hub = _import_hub()
    offline = _offline(hub)
    patterns = None if offline else _files_to_fetch(hub, reference)
    try:
        folder = hub.snapshot_download(
            reference.repo_id,
            revision=reference.revision,
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except hub.utils.LocalEntryNotFoundError as error:
        raise _not_cached(hub, reference, offline) from error
    except (hub.utils.RepositoryNotFoundError, hub.utils.RevisionNotFoundError) as error:
        raise _not_found(reference, error) from error
    except hub.utils.HfHubHTTPError as error:
        raise HubError(f"the Hub refused {reference}: {error}") from error
    folder = Path(folder)
    commit = folder.name
    if not _COMMIT.fullmatch(commit):  # a snapshot folder is named by its commit
        raise HubError(
            f"{reference} resolved to {folder}, which is not a snapshot folder named by a commit "
            "hash; is HF_HUB_CACHE a Hugging Face cache?"
        )
    return HubSnapshot(reference.repo_id, reference.revision, commit, folder)


def locate(model: Any) -> tuple[Any, HubSnapshot | None]:
    """``model`` where it can be read: a Hub reference as its snapshot folder (and the snapshot),
    anything else as it is (and ``None``). The one place other modules resolve the Hub."""
    reference = hub_reference(model)
    if reference is None:
        return model, None
    snapshot = resolve_hub(reference)
    return snapshot.folder, snapshot


def _import_hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.utils  # both bound as attributes of the package (errors: 0.23+)
    except ImportError as error:
        raise MissingDependencyError(
            f"reading models from the Hugging Face Hub needs huggingface_hub: {_INSTALL}."
        ) from error
    return huggingface_hub


def _offline(hub: Any) -> bool:
    """Offline as the Hub library says (read when it was imported), or as the environment says
    now (a test, or a script that sets ``HF_HUB_OFFLINE`` after importing it)."""
    said = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(hub.constants.HF_HUB_OFFLINE) or said


def _files_to_fetch(hub: Any, reference: HubReference) -> list[str] | None:
    """The top-level files worth fetching, as exact names; ``None`` (let ``snapshot_download``
    find the cache, or say why not) when the repository cannot be listed."""
    try:
        files = hub.list_repo_files(reference.repo_id, revision=reference.revision)
    except (hub.utils.RepositoryNotFoundError, hub.utils.RevisionNotFoundError) as error:
        raise _not_found(reference, error) from error
    except Exception:  # no connection: snapshot_download falls back to the cache, or says why
        return None
    top = [name for name in files if "/" not in name]
    chosen = [name for name in top if _matches(name, SIDE_PATTERNS)]
    for patterns in WEIGHT_PATTERNS:
        weights = [name for name in top if _matches(name, patterns)]
        if weights:
            return sorted({*chosen, *weights})
    raise HubError(
        f"{reference} holds no weights terge reads at its top level (*.safetensors, *.bin, *.pt, "
        f"*.pth, *.ckpt); it holds {', '.join(sorted(top)[:12]) or 'no files'}."
    )


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _cache_folder(hub: Any, repo_id: str) -> Path:
    return Path(hub.constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def cached_revisions(repo_id: str) -> list[str]:
    """The branches, tags and commits of ``repo_id`` in the local cache, sorted (refs first)."""
    folder = _cache_folder(_import_hub(), repo_id)
    refs = folder / "refs"
    names = (
        sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())
        if refs.is_dir()
        else []
    )
    snapshots = folder / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    return names + commits


def _not_cached(hub: Any, reference: HubReference, offline: bool) -> HubError:
    """Why a reference is not in the cache, with what is there and the way to fetch it."""
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
    local = f" (and no local file or folder is named {reference.repo_id!r})"
    fetch = f"hf download {reference.repo_id}" + (
        "" if reference.revision is None else f" --revision {reference.revision}"
    )
    cached = cached_revisions(reference.repo_id)
    if not _cache_folder(hub, reference.repo_id).is_dir():
        return HubError(
            f"the Hub model {reference.repo_id!r} is not in the local cache "
            f"({hub.constants.HF_HUB_CACHE}) and {why}{local}; connect (unset HF_HUB_OFFLINE) or "
            f"fetch it first ({fetch}), or pass a local path."
        )
    asked = reference.revision or "main"
    return HubError(
        f"the revision {asked!r} of the Hub model {reference.repo_id!r} is not in the local "
        f"cache and {why}; the cache holds {', '.join(cached) or 'no complete revision'}. "
        f"Ask for one of those, or connect (unset HF_HUB_OFFLINE) or fetch it first ({fetch})."
    )


def _not_found(reference: HubReference, error: Exception) -> HubError:
    what = (
        f"has no revision {reference.revision!r}"
        if "Revision" in type(error).__name__
        else "does not exist, or is private or gated (log in with `hf auth login`)"
    )
    return HubError(
        f"the Hub model {reference.repo_id!r} {what}, and no local file or folder is named "
        f"{str(reference)!r}; check the name (org/name) and revision (a branch, tag or commit "
        "hash), or pass the path of a local checkpoint."
    )
