"""Hub references (``org/name@revision``) read offline from a Hugging Face cache built here.

The cache is laid out as ``huggingface_hub`` lays it out (``models--org--name/{blobs,refs,
snapshots/<commit>}``, snapshot files linking into ``blobs``), and ``huggingface_hub`` itself
reads it with ``HF_HUB_OFFLINE=1``: its resolution is the oracle, not a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import terge
from terge.cli import commands as cli
from terge.errors import HubError, MissingDependencyError
from terge.io.hub import HubReference, hub_reference, hub_shaped, resolve_hub

huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT_A1 = "a1" * 20
COMMIT_A2 = "a2" * 20
COMMIT_B = "b0" * 20
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "torch_dtype": "float32"}


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "h.0.w": torch.randn(4, 3, generator=generator),
        "h.0.b": torch.randn(4, generator=generator),
    }


def publish(
    cache: Path, repo_id: str, commit: str, tensors: dict, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Put one commit of a model repository into the cache, as ``snapshot_download`` would."""
    files = {
        "model.safetensors": save(tensors),
        "config.json": json.dumps(CONFIG).encode(),
        "README.md": b"# the upstream card\n",
    }
    return publish_files(cache, repo_id, commit, files, refs)


def publish_files(
    cache: Path,
    repo_id: str,
    commit: str,
    files: dict[str, bytes],
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """One commit of a repository holding ``files``, as ``snapshot_download`` caches it: the
    snapshot's files link into ``blobs/``, and each ref names the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An offline Hub cache holding org/a (main -> a2, v1 -> a1) and org/b (main -> b)."""
    folder = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    publish(folder, "org/a", COMMIT_A1, weights(1), refs=("v1",))
    publish(folder, "org/a", COMMIT_A2, weights(2), refs=("main",))
    publish(folder, "org/b", COMMIT_B, weights(3))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no local folder named org/... unless a test makes one
    return folder


# --- recognising a reference --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", HubReference("org/name")),
        ("org/name@v1.0", HubReference("org/name", "v1.0")),
        ("org/name@refs/pr/1", HubReference("org/name", "refs/pr/1")),
        ("Org-1/Name_2.x@" + COMMIT_B, HubReference("Org-1/Name_2.x", COMMIT_B)),
        ("hf://gpt2", HubReference("gpt2")),
        ("hf://org/name@main", HubReference("org/name", "main")),
        (Path("hf://org/name"), HubReference("org/name")),  # Path collapses // to /
        ("model.safetensors", None),
        ("gpt2", None),  # a name without an org is a path unless hf:// says otherwise
        ("./org/name", None),
        ("/abs/name", None),
        ("a/b/c", None),
        ("org--x/name", None),
        ("org/na..me", None),
        ("org/name@", None),
        ("org/name@v1/../../x", None),
        ("org/name@v1/", None),  # an empty part of a revision
        ("org/name@.x", None),  # a revision starts with a letter or digit
        ("org/name@-x", None),
        ("org/name@" + "v" * 200, HubReference("org/name", "v" * 200)),
        ("org/name@" + "v" * 201, None),
        ("org/" + "n" * 96, HubReference("org/" + "n" * 96)),  # the Hub's longest name
        ("org/" + "n" * 97, None),
        ("org/-name", None),  # the Hub's names neither start nor end with - or .
        ("org/.name", None),
        ("org/name-", None),
        ("org/name.", None),
        ("org/name.git", None),  # the Hub refuses such names (huggingface_hub's validate_repo_id)
        ("ckpt/epoch=3.ckpt::entry=model", None),
        (42, None),
    ],
)
def test_what_is_a_hub_reference(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    assert hub_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "hf://",
        "hf://bad name",
        "hf://org/name@",
        "hf://a/b/c",
        "hf://org--x/name",
        "hf://org/na..me",
        "hf://org/name@v1/../../x",  # would name a file outside the cache's refs/
        "hf://org/name.git",
    ],
)
def test_a_malformed_explicit_reference_is_an_error(text):
    with pytest.raises(HubError, match=r"is not a Hub reference; write hf://org/name"):
        hub_reference(text)


@pytest.mark.parametrize(
    ("text", "shaped"),
    [
        ("org/name@v1", True),
        ("hf://anything at all", True),  # hf:// is the Hub's, even malformed (then an error)
        ("gpt2", False),
        ("org--x/name", False),
        ("org/name@v1/../x", False),
    ],
)
def test_what_has_a_hub_references_form(text, shaped):
    assert hub_shaped(text) is shaped


def test_a_folder_named_hf_colon_stays_local(tmp_path, monkeypatch):
    """``hf:/org/name`` is ``hf://org/name`` collapsed by ``Path``, unless a folder of exactly
    that name exists: then, like any existing path, it is local."""
    monkeypatch.chdir(tmp_path)
    assert hub_reference("hf:/org/name") == HubReference("org/name")
    (tmp_path / "hf:" / "org" / "name").mkdir(parents=True)
    assert hub_reference("hf:/org/name") is None


def test_a_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_reference("org/name") is None
    assert hub_shaped("org/name")  # the form, whatever exists
    assert hub_reference("hf://org/name") == HubReference("org/name")


# --- resolving offline --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "commit"),
    [(None, COMMIT_A2), ("main", COMMIT_A2), ("v1", COMMIT_A1), (COMMIT_A1, COMMIT_A1)],
)
def test_resolves_a_branch_a_tag_or_a_commit_from_the_cache(cache, asked, commit):
    snapshot = resolve_hub(HubReference("org/a", asked))
    assert (snapshot.repo_id, snapshot.revision, snapshot.commit) == ("org/a", asked, commit)
    # huggingface_hub's own offline lookup agrees on the folder
    found = huggingface_hub.try_to_load_from_cache("org/a", "config.json", revision=asked)
    assert Path(found).parent == snapshot.folder
    assert snapshot.pinned == f"org/a@{commit}"


@pytest.mark.parametrize("name", ["not-a-commit", "a1" * 20 + "a", "A1" * 20])
def test_a_snapshot_folder_not_named_by_a_commit_is_refused(cache, name):
    """The commit recorded in a lineage is the snapshot folder's name: a folder that is not
    named by 40 lowercase hex digits (the Hub's commit form) is no snapshot to pin."""
    publish(cache, "org/c", name, weights(4))
    with pytest.raises(HubError, match=r"org/c resolved to .*not a snapshot folder named by a"):
        resolve_hub("org/c")


def test_resolve_hub_text_is_always_the_hub(cache):
    """``resolve_hub`` is asked for the Hub: with or without ``hf://``, a local folder of the
    same name does not shadow it, and a name without an organisation is a repository."""
    Path("org", "b").mkdir(parents=True)
    publish(cache, "gpt2", COMMIT_B, weights(4))
    assert resolve_hub("org/b").commit == COMMIT_B
    assert resolve_hub("hf://org/a@v1").commit == COMMIT_A1
    assert resolve_hub("gpt2").folder.parent.parent.name == "models--gpt2"


def test_a_revision_not_in_the_cache_lists_what_is(cache):
    with pytest.raises(
        HubError, match=r"revision 'v9' of the Hub model 'org/a' is not in"
    ) as error:
        resolve_hub("org/a@v9")
    message = str(error.value)
    assert f"main, v1, {COMMIT_A1}, {COMMIT_A2}" in message
    assert "HF_HUB_OFFLINE is set" in message and "hf download org/a --revision v9" in message


def test_the_default_branch_not_in_the_cache_lists_branches_tags_and_pull_requests(cache):
    """Without a revision the default branch (main) is asked for; the listing names a pull
    request's ref as it is asked for (``refs/pr/1``), and no folder of ``refs/``."""
    commit = "c0" * 20
    publish(cache, "org/c", commit, weights(4), refs=("refs/pr/1",))
    with pytest.raises(HubError, match=r"the revision 'main' of the Hub model 'org/c' is not in"):
        resolve_hub("org/c")
    with pytest.raises(HubError, match=rf"the cache holds refs/pr/1, {commit}\. Ask"):
        resolve_hub("org/c@v1")
    assert resolve_hub("org/c@refs/pr/1").commit == commit


def test_a_repository_with_no_complete_revision_says_so(cache):
    """An interrupted download leaves the repository's folder without refs or snapshots."""
    (cache / "models--org--c" / "blobs").mkdir(parents=True)
    with pytest.raises(HubError, match=r"'v1' of .* the cache holds no complete revision\. Ask"):
        resolve_hub("org/c@v1")


def test_a_repository_not_in_the_cache_says_how_to_get_it(cache):
    with pytest.raises(HubError, match=r"'org/missing' is not in the local cache") as error:
        terge.open_checkpoint("org/missing")
    assert f"({cache}) and HF_HUB_OFFLINE is set" in str(error.value)
    assert "(hf download org/missing)" in str(error.value)
    assert "no local file or folder is named 'org/missing'" in str(error.value)
    assert isinstance(error.value, terge.CheckpointError)


def test_without_huggingface_hub_the_error_says_what_to_install(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'terge\[llm\]'"):
        terge.open_checkpoint("org/a")


def test_open_and_load_read_a_hub_model(cache):
    with terge.open_checkpoint("org/a@v1") as reader:
        assert reader.hub is not None and reader.hub.commit == COMMIT_A1
        assert torch.equal(reader.get("h.0.w"), weights(1)["h.0.w"])
    loaded = terge.load("hf://org/a")
    assert torch.equal(loaded["h.0.b"], weights(2)["h.0.b"])


# --- merging Hub models -------------------------------------------------------------------------


def test_merging_hub_models_equals_merging_their_folders(cache, tmp_path):
    folders = [resolve_hub("org/a@v1").folder, resolve_hub("org/b").folder]
    by_folder = terge.merge([str(f) for f in folders], weights=[1, 3], out=tmp_path / "x")
    by_hub, lineage = terge.merge(
        ["org/a@v1", "org/b"], weights=[1, 3], out=tmp_path / "y", lineage=True
    )
    first = load_file(by_folder / "model.safetensors")
    second = load_file(by_hub / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    records = [(m.path, m.repo, m.requested_revision, m.revision) for m in lineage.models]
    assert records == [
        (f"org/a@{COMMIT_A1}", "org/a", "v1", COMMIT_A1),
        (f"org/b@{COMMIT_B}", "org/b", None, COMMIT_B),
    ]
    assert lineage.base == lineage.models[0]
    # the file records the same, and reads back equal (no cache path anywhere in it)
    text = (by_hub / "lineage.json").read_text()
    assert str(cache) not in text
    assert terge.load_lineage(by_hub / "lineage.json") == lineage
    # the base folder's config came along; the upstream README was replaced by the merge's card
    assert json.loads((by_hub / "config.json").read_text()) == CONFIG
    assert "the upstream card" not in (by_hub / "README.md").read_text()


def test_a_hub_base_given_apart(cache, tmp_path):
    _, lineage = terge.merge(
        ["org/a@v1", "org/a"], base="org/b", method="task_arithmetic", lineage=True
    )
    assert (lineage.base.index, lineage.base.repo, lineage.base.revision) == (
        "separate",
        "org/b",
        COMMIT_B,
    )


def test_a_local_folder_shadows_the_hub_model(cache, tmp_path):
    local = Path("org") / "a"
    local.mkdir(parents=True)
    (local / "model.safetensors").write_bytes(save(weights(9)))
    merged, lineage = terge.merge(["org/a", "hf://org/a"], lineage=True)
    assert (lineage.models[0].path, lineage.models[0].repo) == ("org/a", None)
    assert (lineage.models[1].repo, lineage.models[1].revision) == ("org/a", COMMIT_A2)
    expected = (weights(9)["h.0.w"].double() + weights(2)["h.0.w"].double()) / 2
    assert torch.equal(merged["h.0.w"], expected.float())


def test_old_lineages_without_hub_fields_still_load(tmp_path):
    _, lineage = terge.merge([weights(1), weights(2)], lineage=True)
    path = terge.save_lineage(lineage, tmp_path / "old.json")
    data = json.loads(path.read_text())
    assert all("repo" not in model for model in data["models"])  # unchanged bytes for them
    assert terge.load_lineage(path) == lineage


def test_hostile_hub_fields_in_a_lineage_are_refused(tmp_path):
    _, lineage = terge.merge([weights(1), weights(2)], lineage=True)
    path = terge.save_lineage(lineage, tmp_path / "l.json")
    data = json.loads(path.read_text())
    data["models"][0]["repo"] = ["org/a"]
    path.write_text(json.dumps(data))
    with pytest.raises(terge.LineageError, match=r"models\[0\]\.repo"):
        terge.load_lineage(path)


def test_verify_reads_hub_models_back_from_the_cache(cache, tmp_path, capsys, monkeypatch):
    out = terge.merge(["org/a@v1", "org/b"], out=tmp_path / "soup", seed=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the lineage's paths are Hub ids, not this folder's paths
    code = cli.main(["lineage", "verify", str(out / "lineage.json"), "--merged", str(out)])
    assert code == 0, capsys.readouterr()


# --- the command line and recipes ---------------------------------------------------------------


def test_the_command_line_takes_hub_models(cache, tmp_path, capsys):
    code = cli.main(["merge", "org/a@v1", "org/b", "-o", str(tmp_path / "out"), "-q"])
    assert code == 0, capsys.readouterr()
    lineage = terge.load_lineage(tmp_path / "out" / "lineage.json")
    assert [m.revision for m in lineage.models] == [COMMIT_A1, COMMIT_B]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"terge merge org/a@v1 org/b -o {tmp_path / 'out'} -q" in card


def test_the_command_line_says_when_a_revision_is_not_cached(cache, tmp_path, capsys):
    code = cli.main(["merge", "org/a@v9", "org/b", "-o", str(tmp_path / "out")])
    assert code == 2
    assert "revision 'v9' of the Hub model 'org/a' is not in the local cache" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_a_recipe_names_hub_models(cache, tmp_path, capsys):
    recipe = tmp_path / "soup.toml"
    recipe.write_text(
        'models = ["org/a@v1", "hf://org/b"]\nout = "out"\nweights = [1, 2]\n', encoding="utf-8"
    )
    assert cli.main(["merge", "--recipe", str(recipe), "-q"]) == 0, capsys.readouterr()
    lineage = terge.load_lineage(tmp_path / "out" / "lineage.json")
    assert [m.repo for m in lineage.models] == ["org/a", "org/b"]


# --- online, with the Hub's answers faked -------------------------------------------------------


@pytest.fixture
def online(cache, monkeypatch):
    """The cache above, online: ``list_repo_files`` answers as given, ``snapshot_download`` is
    recorded and then run offline against the cache (no network here)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    calls: list[dict] = []
    real = huggingface_hub.snapshot_download

    def download(repo_id, **options):
        calls.append({"repo_id": repo_id, **options})
        return real(repo_id, **{**options, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return calls


def refusal(kind: type) -> Exception:
    """One of huggingface_hub's HTTP errors without an HTTP response (only the type matters)."""
    error = kind.__new__(kind)
    Exception.__init__(error, "404 Client Error")
    return error


def test_online_only_the_top_level_files_of_one_kind_of_weights_are_fetched(online, monkeypatch):
    listed = [
        "README.md",
        "config.json",
        "tokenizer.json",
        "merges.txt",
        "model.safetensors",
        "pytorch_model.bin",  # the same weights again: not fetched
        "onnx/model.onnx",
        "unet/diffusion_pytorch_model.safetensors",  # a subfolder: never read
    ]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision: listed)
    snapshot = resolve_hub("org/a@v1")
    assert snapshot.commit == COMMIT_A1
    (call,) = online
    assert call["allow_patterns"] == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (call["revision"], call["local_files_only"]) == ("v1", False)


def test_online_bin_weights_when_there_are_no_safetensors(online, monkeypatch):
    listed = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-1.bin", "x.pt"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision: listed)
    resolve_hub("org/a")
    assert online[0]["allow_patterns"] == [
        "config.json",
        "pytorch_model-1.bin",
        "pytorch_model.bin.index.json",
    ]


def test_online_a_repository_without_weights_is_refused(online, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision: ["a.gguf"])
    with pytest.raises(HubError, match=r"org/a holds no weights terge reads .* it holds a.gguf"):
        resolve_hub("org/a")
    assert online == []  # nothing downloaded


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "RepositoryNotFoundError",
            r"'org/a' does not exist, or is private or gated .*, and no local file or folder is "
            r"named 'org/a@v1'",
        ),
        ("RevisionNotFoundError", r"'org/a' has no revision 'v1'"),
    ],
)
def test_online_unknown_repositories_and_revisions(online, monkeypatch, kind, message):
    error = refusal(getattr(huggingface_hub.utils, kind))

    def refuse(repo, revision):
        raise error

    monkeypatch.setattr(huggingface_hub, "list_repo_files", refuse)
    with pytest.raises(HubError, match=message):
        resolve_hub("org/a@v1")


def test_online_without_a_connection_the_cache_is_used(online, monkeypatch):
    def unreachable(repo, revision):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    assert resolve_hub("org/b").commit == COMMIT_B
    assert online[0]["allow_patterns"] is None


@pytest.mark.parametrize(
    ("variable", "constant", "offline"),
    [
        ("1", False, True),  # set after huggingface_hub was imported: the environment says
        ("true", False, True),
        (" Yes ", False, True),
        ("ON", False, True),
        ("", True, True),  # huggingface_hub read it when imported
        ("0", False, False),
    ],
)
def test_offline_as_the_environment_or_huggingface_hub_says(
    online, monkeypatch, variable, constant, offline
):
    """Offline, nothing is listed on the Hub and only the cache is read."""
    monkeypatch.setenv("HF_HUB_OFFLINE", variable)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", constant)
    listed: list[str] = []

    def files(repo, revision):
        listed.append(repo)
        return ["model.safetensors"]

    monkeypatch.setattr(huggingface_hub, "list_repo_files", files)
    assert resolve_hub("org/b").commit == COMMIT_B
    (call,) = online
    assert (listed, call["local_files_only"]) == ([] if offline else ["org/b"], offline)


def test_online_the_other_weights_and_the_tokenizer_and_code_files(online, monkeypatch):
    """Without safetensors or .bin, every .pt, .pth and .ckpt is the weights; SentencePiece,
    tiktoken and vocabulary files and the remote code come along; nothing else does."""
    listed = ["a.pt", "b.pth", "c.ckpt", "notes.md", "spiece.model", "cl100k.tiktoken"]
    listed += ["modeling_x.py", "vocab.txt", "tokenizer_config.json"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision: listed)
    resolve_hub("org/a")
    assert online[0]["allow_patterns"] == sorted(set(listed) - {"notes.md"})


@pytest.mark.parametrize(
    ("listed", "holds"),
    [
        (
            [f"f{i:02}.gguf" for i in reversed(range(13))],
            ", ".join(f"f{i:02}.gguf" for i in range(12)),
        ),
        (["unet/model.safetensors"], "no files"),  # weights in a subfolder are not read
    ],
)
def test_online_without_weights_the_error_lists_twelve_files(online, monkeypatch, listed, holds):
    """The error shows what the repository holds at its top level: the first twelve names."""
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision: listed)
    with pytest.raises(HubError, match=re.escape(f"*.ckpt); it holds {holds}.") + "$"):
        resolve_hub("org/a")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("RevisionNotFoundError", r"^the Hub model 'org/a' has no revision 'v1', and no local"),
        ("RepositoryNotFoundError", r"^the Hub model 'org/a' does not exist, or is private"),
        ("HfHubHTTPError", r"^the Hub refused org/a@v1: 404 Client Error$"),
    ],
)
def test_online_the_download_refused(online, monkeypatch, kind, message):
    """The repository could be listed, yet the download is refused (the revision moved, the
    token expired, the Hub is down): the error says which reference and why."""
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision: ["x.bin"])

    def refuse(repo_id, **options):
        raise refusal(getattr(huggingface_hub.utils, kind))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(HubError, match=message):
        resolve_hub("org/a@v1")


def test_online_without_a_connection_a_missing_model_says_so(online, monkeypatch):
    def unreachable(repo, revision):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    with pytest.raises(HubError, match=r"'org/missing' is not in .* the Hub could not be reached"):
        resolve_hub("org/missing")


def test_inspect_takes_hub_models(cache, capsys):
    code = cli.main(["inspect", "org/a@v1", "org/b", "--base", "org/a", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)


def test_lineage_show_names_the_hub_models(cache, tmp_path, capsys):
    out = terge.merge(["org/a@v1", "org/b"], out=tmp_path / "soup")
    code = cli.main(["lineage", "show", str(out / "lineage.json"), "--format", "json"])
    shown, err = capsys.readouterr()
    assert code == 0, err
    models = json.loads(shown)["models"]
    assert [(m["repo"], m["requested_revision"], m["revision"], m["pinned"]) for m in models] == [
        ("org/a", "v1", COMMIT_A1, True),
        ("org/b", None, COMMIT_B, True),
    ]


# --- adapters: a Hub base, an adapter on the Hub -------------------------------------------------

COMMIT_BASE = "ba" * 20
COMMIT_LORA = "1a" * 20


def lora_files(base: str) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """A rank-2 LoRA adapter on ``lin`` (4 x 3), lora_alpha 4 (scaling 2), over ``base``."""
    generator = torch.Generator().manual_seed(7)
    factors = {
        "base_model.model.lin.lora_A.weight": torch.randn(2, 3, generator=generator),
        "base_model.model.lin.lora_B.weight": torch.randn(4, 2, generator=generator),
    }
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["lin"],
        "base_model_name_or_path": base,
    }
    files = {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save(factors),
    }
    return files, factors


@pytest.fixture
def lora_cache(cache) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """org/base (a Linear(3, 4)) and org/lora (an adapter over it) in the offline cache."""
    generator = torch.Generator().manual_seed(5)
    base = {"lin.weight": torch.randn(4, 3, generator=generator), "lin.bias": torch.zeros(4)}
    publish_files(cache, "org/base", COMMIT_BASE, {"model.safetensors": save(base)})
    files, factors = lora_files("org/base")
    publish_files(cache, "org/lora", COMMIT_LORA, files)
    return base, factors


def adapted(base: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> torch.Tensor:
    a = factors["base_model.model.lin.lora_A.weight"].double()
    b = factors["base_model.model.lin.lora_B.weight"].double()
    return (base["lin.weight"].double() + 2.0 * (b @ a)).float()


def test_an_adapter_whose_base_is_a_hub_id_reads_it_from_the_cache(lora_cache, tmp_path):
    """PEFT writes the base as a Hub id (base_model_name_or_path: org/name): terge resolves it
    as it resolves any Hub model, and records the adapter's base as pinned."""
    base, factors = lora_cache
    folder = tmp_path / "local-lora"
    folder.mkdir()
    for name, data in lora_files("org/base")[0].items():
        (folder / name).write_bytes(data)
    merged, lineage = terge.merge([str(folder)], lineage=True)
    assert torch.equal(merged["lin.weight"], adapted(base, factors))
    assert lineage.models[0].adapter["base"]["path"] == f"org/base@{COMMIT_BASE}"


def test_an_adapter_on_the_hub_is_an_adapter(lora_cache):
    """org/lora holds adapter_config.json: it is merged as base + delta (not read as a
    checkpoint of two small matrices), and the lineage pins both to their commits."""
    base, factors = lora_cache
    merged, lineage = terge.merge(["org/lora"], lineage=True)
    assert torch.equal(merged["lin.weight"], adapted(base, factors))
    record = lineage.models[0]
    assert (record.kind, record.path, record.repo, record.revision) == (
        "adapter",
        f"org/lora@{COMMIT_LORA}",
        "org/lora",
        COMMIT_LORA,
    )
    assert record.adapter["base"]["path"] == f"org/base@{COMMIT_BASE}"


def test_an_adapter_whose_base_is_neither_here_nor_a_hub_id_says_how_to_give_it(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    for name, data in lora_files("x y")[0].items():  # neither a path nor org/name
        (folder / name).write_bytes(data)
    with pytest.raises(terge.AdapterError, match=r"nor a Hub id .*terge.adapter\("):
        terge.merge([str(folder)])
