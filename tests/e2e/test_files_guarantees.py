"""Trust under failure (issue #13): nothing lost, nothing half-done, nothing let in.

Lineage files never clobber inputs; a merged state dict survives being saved over its inputs;
links never let outside files into an output or a read; dry runs fail as real runs; a killed run
leaves nothing that is never cleaned up; racing runs fail cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import terge
import terge.io.writing as writing
from terge import CheckpointError, LineageError, cli
from terge.io import ShardedWriter, open_checkpoint, save

SRC = Path(terge.__file__).resolve().parent.parent
POSIX = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and symlinks")


def model(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "keep": torch.randn(256, 256, generator=generator),  # 256 KiB: many pages of a map
        "w": torch.randn(8, 8, generator=generator),
    }


def folders(tmp_path: Path, count: int = 2) -> list[Path]:
    paths = []
    for i in range(count):
        path = tmp_path / "ab"[i]
        save(model(i), path)
        (path / "config.json").write_text('{"torch_dtype": "float32"}\n')
        paths.append(path)
    return paths


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def run_python(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- 1: lineage files never overwrite inputs, nor existing files unasked, and are atomic --------


@pytest.mark.parametrize("where", ["b/model.safetensors", "b/notes.json", "b"])
def test_cli_lineage_over_or_inside_an_input_is_refused_before_merging(
    capsys, tmp_path, monkeypatch, where
):
    monkeypatch.chdir(tmp_path)
    _, b = folders(tmp_path)
    weights = (b / "model.safetensors").read_bytes()
    code = cli.main(["merge", "a", "b", "-o", "o", "--lineage", where])
    err = capsys.readouterr().err
    assert code == 2
    if where == "b":
        assert "is a folder" in err
    else:
        assert f"the lineage file (--lineage) {where} is inside the input b" in err
        assert "choose a path outside every input" in err
    assert (b / "model.safetensors").read_bytes() == weights
    assert not Path("o").exists() and not Path("b/notes.json").exists()


def test_recipe_lineage_inside_an_input_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, _ = folders(tmp_path)
    weights = (a / "model.safetensors").read_bytes()
    Path("r.toml").write_text(
        'models = ["a", "b"]\nout = "o"\nlineage = "a/model.safetensors"\n', encoding="utf-8"
    )
    assert cli.main(["merge", "--recipe", "r.toml"]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert (a / "model.safetensors").read_bytes() == weights
    assert not Path("o").exists()


def test_cli_lineage_over_an_existing_file_needs_overwrite(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders(tmp_path)
    Path("l.json").write_text("precious\n")
    assert cli.main(["merge", "a", "b", "-o", "o", "--lineage", "l.json"]) == 2
    assert "l.json' already exists; pass --overwrite" in capsys.readouterr().err
    assert Path("l.json").read_text() == "precious\n" and not Path("o").exists()
    assert cli.main(["merge", "a", "b", "-o", "o", "--lineage", "l.json", "--overwrite"]) == 0
    assert terge.load_lineage("l.json") == terge.load_lineage("o")
    mode = stat.S_IMODE(Path("l.json").stat().st_mode)
    assert mode == 0o666 & ~writing._umask()


def test_save_lineage_refuses_inputs_and_existing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, b = folders(tmp_path)
    _, lineage = terge.merge(["a", "b"], lineage=True)
    weights = (b / "model.safetensors").read_bytes()
    with pytest.raises(LineageError, match=r"lineage file b/model.safetensors is inside the in"):
        terge.save_lineage(lineage, "b/model.safetensors", overwrite=True)
    assert (b / "model.safetensors").read_bytes() == weights
    Path("l.json").write_text("precious\n")
    with pytest.raises(LineageError, match=r"l.json already exists; pass overwrite=True"):
        terge.save_lineage(lineage, "l.json")
    assert Path("l.json").read_text() == "precious\n"
    assert terge.save_lineage(lineage, "l.json", overwrite=True) == Path("l.json")
    assert terge.load_lineage("l.json") == lineage


def test_save_lineage_writes_ordinary_permissions_and_leaves_no_temp_file(tmp_path):
    lineage = terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], dry_run=True)
    old = os.umask(0o027)
    try:
        path = terge.save_lineage(lineage, tmp_path / "l.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 & ~umask, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json"]


def test_a_failed_lineage_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    lineage = terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], dry_run=True)
    (tmp_path / "l.json").write_text("old\n")

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        terge.save_lineage(lineage, tmp_path / "l.json", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json"]
    assert (tmp_path / "l.json").read_text() == "old\n"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_lineage_file_is_flushed_to_disk_before_it_is_renamed_into_place(
    tmp_path, monkeypatch, overwrite
):
    """Atomic means temporary file, fsync, rename: the temporary file's data reaches the disk
    before it gets the lineage file's name (else a crash after the rename can leave it empty)."""
    lineage = terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], dry_run=True)
    if overwrite:
        (tmp_path / "l.json").write_text("old\n")
    events: list[str] = []
    real_fsync, real_link, real_replace = os.fsync, os.link, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync file" if stat.S_ISREG(os.fstat(fd).st_mode) else "fsync folder")
        real_fsync(fd)

    def link(source: object, destination: object, **kwargs: object) -> None:
        events.append("named")
        real_link(source, destination, **kwargs)

    def replace(source: object, destination: object, **kwargs: object) -> None:
        events.append("named")
        real_replace(source, destination, **kwargs)

    monkeypatch.setattr(writing.os, "fsync", fsync)
    monkeypatch.setattr(writing.os, "link", link)
    monkeypatch.setattr(writing.os, "replace", replace)
    terge.save_lineage(lineage, tmp_path / "l.json", overwrite=overwrite)
    assert "named" in events and "fsync file" in events, events
    assert events.index("fsync file") < events.index("named"), events
    assert terge.load_lineage(tmp_path / "l.json") == lineage


def test_a_lineage_file_appearing_meanwhile_is_not_clobbered(tmp_path, monkeypatch):
    lineage = terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], dry_run=True)
    target = tmp_path / "l.json"
    real_mkstemp = writing.tempfile.mkstemp

    def racing_mkstemp(**kwargs: object) -> tuple[int, str]:
        target.write_text("the other run's\n")  # appears after the check, before the write
        return real_mkstemp(**kwargs)

    monkeypatch.setattr(writing.tempfile, "mkstemp", racing_mkstemp)
    with pytest.raises(LineageError, match="appeared while it was being written"):
        terge.save_lineage(lineage, target)
    assert target.read_text() == "the other run's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json"]


# -- 2: what merge() of paths returns can be saved over its own inputs -------------------------

SAVE_OVER_INPUT = """
import torch, terge
from safetensors.torch import save_file
from terge.io import save
how, base = {how!r}, {base!r}
m = terge.merge([base, "other.safetensors"], excluded=["keep"])
if how == "torch":
    torch.save(m, base)
elif how == "safetensors":
    save_file(m, base)
else:
    save(m, base, overwrite=True)
print("saved")
"""


@POSIX
@pytest.mark.parametrize(
    ("how", "base"),
    [("torch", "ckpt.bin"), ("safetensors", "ckpt.safetensors"), ("terge", "ckpt")],
)
def test_a_merge_of_paths_can_be_saved_over_its_base(tmp_path, how, base):
    first, second = model(0), model(1)
    if how == "torch":
        torch.save(first, tmp_path / base)
    elif how == "safetensors":
        save_file(first, tmp_path / base)
    else:
        save(first, tmp_path / base)
    save_file(second, tmp_path / "other.safetensors")
    done = run_python(SAVE_OVER_INPUT.format(how=how, base=base), tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # not -7 (SIGBUS)
    if how == "torch":
        saved = torch.load(tmp_path / base, weights_only=True)
    else:
        file = tmp_path / base / "model.safetensors" if how == "terge" else tmp_path / base
        saved = load_file(file)
    assert torch.equal(saved["keep"], first["keep"])
    assert torch.allclose(saved["w"], (first["w"] + second["w"]) / 2)


TRUNCATE_BASE = """
import torch, terge
merged = terge.merge(["a.safetensors", "b.safetensors"])
kept = terge.merge(["a.safetensors", "b.safetensors"], excluded="keep")
open("a.safetensors", "wb").close()  # truncate the base: a view of it would now fault
print(float(kept["keep"].sum()), float(merged["keep"].sum()))
"""


@POSIX
def test_a_merge_of_paths_returns_no_views_of_the_files(tmp_path):
    save_file(model(0), tmp_path / "a.safetensors")
    save_file(model(1), tmp_path / "b.safetensors")
    done = run_python(TRUNCATE_BASE, tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # not -7 (SIGBUS)
    kept, merged = map(float, done.stdout.split())
    assert kept == pytest.approx(float(model(0)["keep"].sum()), rel=1e-5)
    both = (model(0)["keep"] + model(1)["keep"]) / 2
    assert merged == pytest.approx(float(both.sum()), rel=1e-4, abs=1e-3)


# -- 5: links out of the base folder are never copied into out= ----------------------------------


@POSIX
def test_links_out_of_the_base_folder_are_not_copied(tmp_path):
    a, b = folders(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    (a / "tokenizer.json").symlink_to(secret)
    (a / "special_tokens_map.json").symlink_to("/etc/passwd")
    (a / "vocab.txt").write_text("hello\n")
    (a / "vocab_link.txt").symlink_to("vocab.txt")  # inside the folder: copied
    with pytest.warns(UserWarning, match=r"did not copy 2 file\(s\) of .*tokenizer\.json ->"):
        out = terge.merge([a, b], out=tmp_path / "s")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "lineage.json",
        "model.safetensors",
        "vocab.txt",
        "vocab_link.txt",
    ]
    assert (out / "vocab_link.txt").read_text() == "hello\n"
    assert not (out / "vocab_link.txt").is_symlink()


@POSIX
def test_a_config_link_out_of_the_folder_is_neither_copied_nor_rewritten(tmp_path):
    a, b = folders(tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"torch_dtype": "float32", "secret": "token"}\n')
    (a / "config.json").unlink()
    (a / "config.json").symlink_to(elsewhere)
    with pytest.warns(UserWarning, match="config.json"):
        out = terge.merge([a, b], out=tmp_path / "s", out_dtype="bfloat16")
    assert not (out / "config.json").exists()


def hub_snapshot(root: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face Hub cache repo: the snapshot's files are links into ../../blobs/."""
    repo = root / "hub" / "models--org--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file(state, blobs / "f00d")
    (blobs / "c0fe").write_text('{"torch_dtype": "float32"}\n')
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    (snapshot / "config.json").symlink_to("../../blobs/c0fe")
    return snapshot


@POSIX
def test_hub_cache_snapshots_keep_working(tmp_path):
    snapshot = hub_snapshot(tmp_path, model(0))
    save(model(1), tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = terge.merge([snapshot, tmp_path / "b"], out=tmp_path / "s")
    assert (out / "config.json").read_text() == '{"torch_dtype": "float32"}\n'
    merged = load_file(out / "model.safetensors")
    assert torch.allclose(merged["w"], (model(0)["w"] + model(1)["w"]) / 2)


# -- 6: index entries and shard links must stay inside the checkpoint's folder -----------------


def indexed(tmp_path: Path, shard: str) -> Path:
    folder = tmp_path / "a"
    folder.mkdir()
    index = {"metadata": {}, "weight_map": {"w": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("absolute", [False, True])
def test_index_entries_outside_the_folder_are_refused(tmp_path, absolute):
    save(model(1), tmp_path / "b")
    outside = tmp_path / "b" / "model.safetensors"
    folder = indexed(tmp_path, str(outside) if absolute else "../b/model.safetensors")
    entry = str(outside) if absolute else "../b/model.safetensors"
    with pytest.raises(CheckpointError, match=f"names shard '{entry}', which is not a file insi"):
        open_checkpoint(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json names shard"):
        terge.merge([folder, tmp_path / "b"])


@POSIX
def test_shard_links_out_of_the_folder_are_refused(tmp_path):
    save(model(1), tmp_path / "b")
    folder = indexed(tmp_path, "model.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "b" / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"index.json: shard 'model.safetensors' of the index resolves to .*b/model\.safe",
    ):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").unlink()  # unindexed: the same rule
    with pytest.raises(CheckpointError, match=r"model.safetensors is a link that resolves to"):
        open_checkpoint(folder)
    # A shard linked within the folder is fine.
    (folder / "model.safetensors").unlink()
    save_file(model(1), folder / "real.bin.safetensors")
    (folder / "model.safetensors").symlink_to("real.bin.safetensors")
    assert open_checkpoint(folder).names() == ["keep", "w"]


# -- 12: a dry run fails exactly where the real call would ---------------------------------------


@pytest.mark.parametrize("case", ["exists", "inside"])
def test_dry_run_checks_the_output_as_the_real_call(tmp_path, case):
    a, b = folders(tmp_path)
    out = tmp_path / "o" if case == "exists" else a / "sub"
    if case == "exists":
        out.mkdir()
    errors = []
    for dry_run in (False, True):
        with pytest.raises(CheckpointError) as caught:
            terge.merge([a, b], out=out, dry_run=dry_run)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]
    assert ("already exists" if case == "exists" else "is inside the input") in errors[0][1]
    assert terge.merge([a, b], out=tmp_path / "fresh", dry_run=True) is not None
    assert not (tmp_path / "fresh").exists()


# -- 13: killed runs, stale temporary folders, racing runs ---------------------------------------

SLOW_MERGE = """
import sys, time, torch, terge

def slow(tensors, weights, base):
    print("merging", flush=True)
    time.sleep(60)
    return tensors[0]

terge.merge(["a", "b"], out="o", method=slow)
"""


def start_slow_merge(tmp_path: Path) -> subprocess.Popen:
    folders(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_MERGE)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    assert line == "merging\n", child.stderr.read()
    assert any(".o.tmp-" in name for name in leftovers(tmp_path))  # it is mid-write
    return child


@POSIX
def test_sigterm_mid_write_removes_the_temporary_folder(tmp_path):
    child = start_slow_merge(tmp_path)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 128 + signal.SIGTERM
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "o").exists()


def test_ctrl_c_mid_write_removes_the_temporary_folder(tmp_path):
    """A KeyboardInterrupt while the folder is being written (here from a user's method, at the
    second tensor, with the temporary folder already made) leaves neither it nor the output."""
    a, b = folders(tmp_path)
    seen: list[list[str]] = []

    def interrupted(tensors, weights, base):
        seen.append(leftovers(tmp_path))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return tensors[0]

    with pytest.raises(KeyboardInterrupt):
        terge.merge([a, b], out=tmp_path / "o", method=interrupted)
    assert len(seen) == 2 and any(".o.tmp-" in name for name in seen[1])  # it was mid-write
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "o").exists()


@POSIX
def test_what_sigkill_leaves_is_removed_by_the_next_run(tmp_path):
    child = start_slow_merge(tmp_path)
    child.kill()
    child.wait(timeout=60)
    (left,) = leftovers(tmp_path)
    assert left.startswith(f".o.tmp-{writing._HOST}-{child.pid}-")
    with pytest.warns(UserWarning, match=rf"process {child.pid}\) was stopped .*removed .*{left}"):
        terge.merge([tmp_path / "a", tmp_path / "b"], out=tmp_path / "o")
    assert leftovers(tmp_path) == []
    assert (tmp_path / "o" / "model.safetensors").is_file()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@POSIX
def test_leftovers_of_live_processes_and_other_machines_are_kept(tmp_path):
    live = tmp_path / f".x.tmp-{writing._HOST}-{os.getppid()}-abc123"
    other = tmp_path / f".y.tmp-00000000-{dead_pid()}-abc123"
    mine_dead = tmp_path / f".z.tmp-{writing._HOST}-{dead_pid()}-abc123"
    for folder in (live, other, mine_dead):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    stopped = pytest.warns(UserWarning, match="was stopped while writing")
    with stopped, ShardedWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(2))
    assert leftovers(tmp_path) == sorted([live.name, other.name])


@POSIX
def test_an_old_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    pid = dead_pid()
    old = tmp_path / f".out.old-{writing._HOST}-{pid}-1234abcd"
    save({"w": torch.ones(2)}, old)
    put_back = pytest.warns(UserWarning, match=rf"put back {tmp_path / 'out'}")
    with put_back, ShardedWriter(tmp_path / "other") as writer:
        writer.add("w", torch.zeros(2))
    assert leftovers(tmp_path) == []
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], torch.ones(2))


def test_sigterm_handler_is_restored_and_a_programs_own_is_kept(tmp_path):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with ShardedWriter(tmp_path / "o") as writer:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        writer.add("w", torch.ones(2))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with ShardedWriter(tmp_path / "p") as writer:
            assert signal.getsignal(signal.SIGTERM) is own
            writer.add("w", torch.ones(2))
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_runs_racing_for_one_output(tmp_path, monkeypatch, overwrite):
    target = tmp_path / "o"
    if overwrite:
        save({"w": torch.zeros(2)}, target)
    real_rename = os.rename

    def racing_rename(source: object, destination: object) -> None:
        if Path(destination) == target and ".tmp-" in Path(source).name:
            # The other run installs its output between our check and our rename.
            if target.exists():
                real_rename(target, tmp_path / "elsewhere")
            target.mkdir()
            save_file({"w": torch.full((2,), 7.0)}, target / "model.safetensors")
        real_rename(source, destination)

    monkeypatch.setattr(writing.os, "rename", racing_rename)
    appeared = pytest.raises(CheckpointError, match="appeared while it was being written")
    with appeared, ShardedWriter(target, overwrite=overwrite) as writer:
        writer.add("w", torch.ones(2))
    assert leftovers(tmp_path) == []
    assert torch.equal(load_file(target / "model.safetensors")["w"], torch.full((2,), 7.0))


@POSIX
def test_a_lineage_temp_file_of_a_killed_run_is_removed_by_the_next_write(tmp_path):
    left = tmp_path / f".l.json.tmp-{writing._HOST}-{dead_pid()}-abc123"
    left.write_text('{"half": ')
    lineage = terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], dry_run=True)
    with pytest.warns(UserWarning, match=rf"removed its leftover {left}"):
        terge.save_lineage(lineage, tmp_path / "l.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json"]


def _sigterm_self() -> None:
    # Never with the default handler: that would kill the test run.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_sigterm_while_renaming_into_place_waits_for_the_rename(tmp_path, monkeypatch, overwrite):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if overwrite:
        save({"w": torch.zeros(2)}, tmp_path / "out")
    real_rename = os.rename
    renames: list[str] = []

    def rename(source: object, destination: object) -> None:
        if Path(destination).parent == tmp_path:  # installing (not naming the shards)
            if not renames:
                _sigterm_self()
            renames.append(Path(destination).name)
        real_rename(source, destination)

    def write() -> None:
        with ShardedWriter(tmp_path / "out", overwrite=overwrite) as writer:
            writer.add("w", torch.ones(2))
            monkeypatch.setattr(writing.os, "rename", rename)

    with pytest.raises(SystemExit) as exited:
        write()
    assert exited.value.code == 128 + signal.SIGTERM
    assert len(renames) == (2 if overwrite else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], torch.ones(2))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_sigterm_while_removing_the_temporary_folder_waits_for_it(tmp_path, monkeypatch):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    real_rmtree = writing.shutil.rmtree

    def rmtree(path: object, **kwargs: object) -> None:
        _sigterm_self()
        real_rmtree(path, **kwargs)

    def write() -> None:
        with ShardedWriter(tmp_path / "out") as writer:
            writer.add("w", torch.ones(2))
            monkeypatch.setattr(writing.shutil, "rmtree", rmtree)
            raise RuntimeError("boom")

    with pytest.raises(SystemExit) as exited:
        write()
    assert exited.value.code == 128 + signal.SIGTERM
    assert isinstance(exited.value.__context__, RuntimeError)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("where", ["entering", "committing"])
def test_a_ctrl_c_while_entering_or_committing_leaves_nothing(tmp_path, monkeypatch, where):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if where == "committing":
        monkeypatch.setattr(writing, "save_file", interrupted)
    else:
        monkeypatch.setattr(writing.shutil, "copy2", interrupted)

    def write() -> None:
        with ShardedWriter(tmp_path / "out", copy_files_from=tmp_path / "base") as writer:
            writer.add("w", torch.ones(2))

    with pytest.raises(KeyboardInterrupt):
        write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_ctrl_c_as_the_old_output_is_moved_aside_puts_it_back(tmp_path, monkeypatch):
    """Ctrl-C lands as soon as a system call returns: if it comes just as the existing output has
    been moved aside, that output is put back, not left hidden while the process lives on."""
    save({"old": torch.ones(2)}, tmp_path / "out")
    real_rename = os.rename

    def rename(source: object, destination: object) -> None:
        real_rename(source, destination)
        if Path(source) == tmp_path / "out":
            raise KeyboardInterrupt  # delivered right after the rename

    monkeypatch.setattr(writing.os, "rename", rename)

    def write() -> None:
        with ShardedWriter(tmp_path / "out", overwrite=True) as writer:
            writer.add("new", torch.zeros(2))

    with pytest.raises(KeyboardInterrupt):
        write()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    kept = load_file(tmp_path / "out" / "model.safetensors")
    assert list(kept) == ["old"] and torch.equal(kept["old"], torch.ones(2))
    assert writing.clean_leftovers(tmp_path) == []
