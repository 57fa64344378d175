"""Checkpoint-file benchmark: merging three GPT-2 checkpoints on disk, terge vs mergekit vs disk.

Run from the repository root::

    python benchmarks/bench_files.py                    # full run (a few minutes, ~6 GB of disk)
    python benchmarks/bench_files.py --quick            # tiny checkpoints, smoke test
    python benchmarks/bench_files.py --skip-mergekit --repeat 5 --json results.json

Inputs (made once, kept under ``benchmarks/.cache/files/`` and reused): three checkpoints laid
out as Hugging Face writes GPT-2 (``transformer.h.0.attn.c_attn.weight`` of shape ``[768, 2304]``
as in ``Conv1D``, ``lm_head`` tied to ``transformer.wte`` and so not saved), random fp32 weights,
each saved as 3 safetensors shards with ``model.safetensors.index.json`` and a GPT-2
``config.json``: GPT-2 small (124M parameters, 475 MiB) and a twice-as-large variant
(``n_embd=1152``: 250M parameters, 955 MiB, every tensor 1.5-2.25x larger).

Every case is a whole command in a fresh process, start-up included, timed from spawn to exit:

- terge: ``python -m terge merge A B C -o OUT --overwrite --quiet`` (this checkout's ``src/`` on
  ``PYTHONPATH``), or ``terge.merge([A, B, C], out=OUT, overwrite=True)`` through ``python -c``
  where the CLI is not available;
- mergekit: ``mergekit-yaml config.yml OUT --no-copy-tokenizer --no-write-model-card --quiet`` on a
  linear merge of the three (equal weights, ``dtype: float32``), from a separate virtual
  environment at ``benchmarks/.cache/mergekit-venv`` (see ``--help`` of ``--setup-mergekit``);
- disk floor: ``cat`` of the three models' shards to ``/dev/null``, then ``cp`` of one model's
  shards to a new folder and ``sync`` of the copies (fsync, as terge's writer does before its
  atomic rename).

Before each run the output folder is removed and the input files are evicted from the page cache
(``posix_fadvise(DONTNEED)`` after ``fdatasync``), so every contestant reads its inputs from disk
while Python, torch and the other libraries stay cached; ``--warm`` skips the eviction. Times are
the best of ``--repeat`` runs. Memory is sampled every ~5 ms from ``/proc/<pid>/status`` over the
command's process tree: the peak of ``RssAnon`` (resident memory not backed by a file, so pages of
memory-mapped checkpoints do not count) and, for reference, ``VmHWM`` (all resident memory,
largest process).

Adapters (issue #16): ``terge.merge([adapter_a, adapter_b, model_1], out=...)``, where the two
adapters are PEFT-format LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``,
rank 16 on every linear layer, ``Conv1D`` so ``fan_in_fan_out``) over model 0: each adapted
tensor is ``base + delta`` computed in float64 one tensor at a time, so the peak ``RssAnon``
should stay flat, as for three plain checkpoints. ``--only adapter`` runs just that case and
the plain terge case beside it (GPT-2 small, no mergekit, no disk floor).

Exactness: terge's output is compared tensor by tensor with the in-memory float64 merge of the
same three state dicts (``terge.merge([sd_a, sd_b, sd_c])``), which must be bit-for-bit equal;
mergekit's output is compared with both (max absolute difference).

Vocabulary union (issue #16, part 3): three GPT-2 small checkpoints whose vocabularies differ
(the first has GPT-2's 50257 rows; the second and third have 64 and 128 added tokens, 32 of them
shared, so ``vocab_size`` 50321 and 50385), each with a ``tokenizer.json`` (a WordLevel stand-in
for GPT-2's vocabulary, made here: the same 50257 strings in all three, then the added tokens),
merged with ``terge merge A B C -o OUT --vocabulary union`` (50417 output rows); its peak
``RssAnon`` is set beside the plain merge's. ``--only vocabulary`` runs just these two cases.

The script prints a markdown report with PASS/FAIL lines for the targets and always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from _common import (
    CACHE_DIR,
    MIB,
    REPO_ROOT,
    SRC_DIR,
    command_line,
    fmt_mib,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    markdown_table,
    source_revision,
)

FILES_DIR = CACHE_DIR / "files"
MERGEKIT_VENV = CACHE_DIR / "mergekit-venv"
MERGEKIT_YAML = MERGEKIT_VENV / "bin" / "mergekit-yaml"
MERGEKIT_TORCH = "torch==2.13.0"

N_SHARDS = 3
SAMPLE_INTERVAL_S = 0.005
RESCAN_EVERY = 20  # samples between scans of /proc for new descendant processes
RUN_TIMEOUT_S = 1800

# Targets.
MAX_ANON_BYTES = 400 * 10**6  # "400 MB"
MAX_VS_MERGEKIT = 0.5
MAX_VS_FLOOR = 1.5  # for later work


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFGPT2:
    """The fields of transformers' ``GPT2Config`` that shape a GPT-2 checkpoint."""

    label: str
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes in the order ``GPT2LMHeadModel.state_dict()`` lists them."""
        e = self.n_embd
        yield "transformer.wte.weight", (self.vocab_size, e)
        yield "transformer.wpe.weight", (self.n_positions, e)
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            yield p + "ln_1.weight", (e,)
            yield p + "ln_1.bias", (e,)
            yield p + "attn.c_attn.weight", (e, 3 * e)  # Conv1D: [in, out]
            yield p + "attn.c_attn.bias", (3 * e,)
            yield p + "attn.c_proj.weight", (e, e)
            yield p + "attn.c_proj.bias", (e,)
            yield p + "ln_2.weight", (e,)
            yield p + "ln_2.bias", (e,)
            yield p + "mlp.c_fc.weight", (e, 4 * e)
            yield p + "mlp.c_fc.bias", (4 * e,)
            yield p + "mlp.c_proj.weight", (4 * e, e)
            yield p + "mlp.c_proj.bias", (e,)
        yield "transformer.ln_f.weight", (e,)
        yield "transformer.ln_f.bias", (e,)

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes())

    def config_json(self) -> dict[str, Any]:
        return {
            "activation_function": "gelu_new",
            "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1,
            "bos_token_id": self.vocab_size - 1,  # 50256 for GPT-2
            "embd_pdrop": 0.1,
            "eos_token_id": self.vocab_size - 1,
            "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05,
            "model_type": "gpt2",
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_inner": None,
            "n_layer": self.n_layer,
            "n_positions": self.n_positions,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.1,
            "scale_attn_by_inverse_layer_idx": False,
            "scale_attn_weights": True,
            "summary_activation": None,
            "summary_first_dropout": 0.1,
            "summary_proj_to_labels": True,
            "summary_type": "cls_index",
            "summary_use_proj": True,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


SMALL = HFGPT2("GPT-2 small")
LARGE = HFGPT2("twice-size (n_embd 1152)", n_embd=1152)
SMALL_QUICK = HFGPT2("tiny", vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
LARGE_QUICK = HFGPT2("tiny twice-size", vocab_size=1000, n_positions=128, n_embd=96, n_layer=2)


def random_state_dict(config: HFGPT2, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights: N(0, 0.02), LayerNorm weights 1 + N(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in config.shapes():
        tensor = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
        if ".ln_" in name and name.endswith(".weight"):
            tensor.add_(1.0)
        tensors[name] = tensor
    return tensors


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, n_shards: int) -> None:
    """Write ``n_shards`` contiguous, roughly equal shards and the index, as HF does."""
    from safetensors.torch import save_file

    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[] for _ in range(n_shards)]
    done = 0
    for name, size in sizes.items():
        groups[min(n_shards - 1, int(n_shards * (done + size / 2) / total))].append(name)
        done += size
    groups = [g for g in groups if g]
    weight_map = {}
    for number, names in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, folder / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def checkpoint(config: HFGPT2, seed: int, folder: Path) -> Path:
    """The checkpoint folder for ``config`` and ``seed``, made once and then reused."""
    spec = {**asdict(config), "seed": seed, "shards": N_SHARDS, "format": 1}
    marker = folder / "bench_spec.json"
    config_text = json.dumps(config.config_json(), indent=2) + "\n"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        if (folder / "config.json").read_text() != config_text:
            (folder / "config.json").write_text(config_text)
        return folder
    print(f"  making {folder} ...", file=sys.stderr, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    save_sharded(random_state_dict(config, seed), tmp, N_SHARDS)
    (tmp / "config.json").write_text(config_text)
    (tmp / "bench_spec.json").write_text(json.dumps(spec) + "\n")
    os.sync()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


ADAPTER_RANK = 16


def adapter_folder(config: HFGPT2, base: Path, seed: int, folder: Path) -> Path:
    """A PEFT-format LoRA adapter (rank 16, every linear layer) over ``base``, made once."""
    from safetensors.torch import save_file

    spec = {**asdict(config), "seed": seed, "rank": ADAPTER_RANK, "base": str(base), "format": 1}
    marker = folder / "bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1000 + seed)
    tensors = {}
    e, r = config.n_embd, ADAPTER_RANK
    for i in range(config.n_layer):
        for module, (inputs, outputs) in {
            "attn.c_attn": (e, 3 * e),
            "attn.c_proj": (e, e),
            "mlp.c_fc": (e, 4 * e),
            "mlp.c_proj": (4 * e, e),
        }.items():
            name = f"base_model.model.transformer.h.{i}.{module}"
            a = torch.empty(r, inputs).normal_(0.0, 0.02, generator=generator)
            b = torch.empty(outputs, r).normal_(0.0, 0.02, generator=generator)
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
    save_file(tensors, folder / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "fan_in_fan_out": True,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "base_model_name_or_path": rel(base),
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    marker.write_text(json.dumps(spec) + "\n")
    return folder


VOCAB_ADDED = ((), tuple(range(64)), tuple(range(32, 160)))
"""The added tokens (``<extra_K>``) of the vocabulary-union case's three checkpoints."""


def vocabulary_checkpoints(config: HFGPT2, prefix: str) -> list[Path]:
    """Three checkpoints whose vocabularies differ (see the module's docstring), each with a
    ``tokenizer.json`` whose ids match its rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folders = []
    for seed, added in enumerate(VOCAB_ADDED):
        sized = HFGPT2(
            config.label,
            config.vocab_size + len(added),
            config.n_positions,
            config.n_embd,
            config.n_layer,
            config.n_head,
        )
        folder = checkpoint(sized, seed, FILES_DIR / f"{prefix}gpt2-vocab-{seed}")
        vocab = {f"tok{i}": i for i in range(config.vocab_size)}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="tok0"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.add_tokens([f"<extra_{k}>" for k in added])
        tokenizer.save(str(folder / "tokenizer.json"))
        folders.append(folder)
    return folders


def rel(path: Path) -> str:
    """``path`` relative to the repository root (where every command runs), for short commands."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in shard_files(folder))


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = shard_files(folder)
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def evict(paths: Sequence[Path]) -> None:
    """Drop ``paths``' pages from the page cache (written back first, so they can go)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# Running a command while sampling its memory
# --------------------------------------------------------------------------------------------------


def _status_kib(pid: int, fields: Sequence[str]) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            text = status.read()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            found[key] = int(rest.split()[0])
    return found


def _descendants(root: int) -> list[int]:
    """``root`` and every process descending from it (one scan of ``/proc``)."""
    parent_of = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent_of[int(entry.name)] = int(fields[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent_of.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sorted(tree)


@dataclass
class Run:
    seconds: float
    returncode: int
    anon_peak_mib: float
    hwm_mib: float
    output_tail: str


def run_sampled(cmd: Sequence[str], env: dict[str, str]) -> Run:
    """Run ``cmd`` to completion, sampling its process tree's ``RssAnon`` every ~5 ms."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        pid = proc.pid
        tree = [pid]
        anon_peak = hwm_peak = 0
        samples = 0
        deadline = start + RUN_TIMEOUT_S
        while True:
            waited, status, _ = os.wait4(pid, os.WNOHANG)
            if waited == pid:
                seconds = time.perf_counter() - start
                break
            if time.perf_counter() > deadline:
                proc.kill()
                waited, status, _ = os.wait4(pid, 0)
                seconds = math.inf
                break
            if samples % RESCAN_EVERY == RESCAN_EVERY - 1:
                tree = _descendants(pid)
            anon = 0
            for member in tree:
                fields = _status_kib(member, ("RssAnon", "VmHWM"))
                if fields:
                    anon += fields.get("RssAnon", 0)
                    hwm_peak = max(hwm_peak, fields.get("VmHWM", 0))
            anon_peak = max(anon_peak, anon)
            samples += 1
            time.sleep(SAMPLE_INTERVAL_S)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-2000:]
    return Run(seconds, proc.returncode, anon_peak / 1024, hwm_peak / 1024, tail)


def run_case(
    name: str,
    cmd: Sequence[str],
    env: dict[str, str],
    inputs: Sequence[Path],
    out: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Best of ``--repeat`` runs; each starts from no output and (unless --warm) cold inputs."""
    shown = shlex.join(["python" if c == sys.executable else c for c in cmd])
    print(f"  running {name}: {shown}", file=sys.stderr, flush=True)
    runs = []
    for _ in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        # Commit the deletion now: on a filesystem mounted with `discard` the freed blocks are
        # trimmed at the next journal commit, which would otherwise stall this run's I/O.
        os.sync()
        if not args.warm:
            evict([f for folder in inputs for f in shard_files(folder)])
        run = run_sampled(cmd, env)
        if run.returncode != 0:
            return {"error": f"exit {run.returncode}: {run.output_tail.strip()[-600:]}"}
        runs.append(run)
        print(
            f"    {run.seconds:.2f} s, RssAnon peak {run.anon_peak_mib:.0f} MiB, "
            f"VmHWM {run.hwm_mib:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    return {
        "command": shown,
        "seconds": min(r.seconds for r in runs),
        "all_seconds": [r.seconds for r in runs],
        "anon_peak_mib": max(r.anon_peak_mib for r in runs),
        "hwm_mib": max(r.hwm_mib for r in runs),
    }


_API_SCRIPT = """
import json, sys, time
import terge
inputs, out = sys.argv[1:-1], sys.argv[-1]
started = time.perf_counter()
terge.merge(inputs, out=out, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def run_api_case(inputs: Sequence[Path], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``terge.merge(paths, out=...)`` timed inside a Python that has already imported terge (and
    torch): the merge itself, without the interpreter's start-up. Inputs cold as for the CLI."""
    cmd = [sys.executable, "-c", _API_SCRIPT, *map(rel, inputs), rel(out)]
    print("  running terge.merge(out=) in Python", file=sys.stderr, flush=True)
    times = []
    for _ in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        if not args.warm:
            evict([f for folder in inputs for f in shard_files(folder)])
        done = subprocess.run(cmd, env=terge_env(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return {"error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
        times.append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
        print(f"    {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return {"command": "terge.merge(inputs, out=...)", "seconds": min(times), "all_seconds": times}


# --------------------------------------------------------------------------------------------------
# Contestants
# --------------------------------------------------------------------------------------------------


def terge_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC_DIR)
    return env


def terge_command(inputs: Sequence[Path], out: Path) -> tuple[list[str] | None, str]:
    """terge's CLI if it works, else ``merge(out=...)`` through ``python -c``, else None."""
    probe = subprocess.run(
        [sys.executable, "-m", "terge", "merge", "--help"],
        env=terge_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode == 0:
        cmd = [sys.executable, "-m", "terge", "merge", *map(rel, inputs), "-o", rel(out)]
        return [*cmd, "--overwrite", "--quiet"], "CLI"
    sys.path.insert(0, str(SRC_DIR))
    try:
        import terge

        has_out = "out" in inspect.signature(terge.merge).parameters
    finally:
        sys.path.remove(str(SRC_DIR))
    if not has_out:
        return None, "neither `python -m terge merge` nor `terge.merge(out=...)` exists yet"
    code = (
        f"import terge; terge.merge({[rel(p) for p in inputs]!r}, out={rel(out)!r}, overwrite=True)"
    )
    return [sys.executable, "-c", code], "merge(out=...) (no CLI yet)"


def setup_mergekit() -> None:
    """Create the venv and install mergekit on a CPU torch (never a terge dependency)."""
    pip = [str(MERGEKIT_VENV / "bin" / "pip"), "install", "--disable-pip-version-check"]
    if not (MERGEKIT_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    subprocess.run([*pip, MERGEKIT_TORCH], check=True)  # first: a local CPU build
    subprocess.run([*pip, "mergekit"], check=True)


def mergekit_version() -> str | None:
    python = MERGEKIT_VENV / "bin" / "python"
    code = (
        "import importlib.metadata as m; "
        "print(m.version('mergekit'), m.version('torch'), m.version('transformers'))"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    mergekit, torch_version, transformers = proc.stdout.split()
    return f"mergekit {mergekit} (torch {torch_version}, transformers {transformers})"


def mergekit_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def mergekit_command(inputs: Sequence[Path], out: Path, config_path: Path) -> list[str]:
    lines = ["merge_method: linear", "dtype: float32", "models:"]
    for path in inputs:
        lines += [f"  - model: {path}", "    parameters:", "      weight: 1.0"]
    config_path.write_text("\n".join(lines) + "\n")
    return [
        rel(MERGEKIT_YAML),
        rel(config_path),
        rel(out),
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
    ]


def floor_command(inputs: Sequence[Path], out: Path) -> list[str]:
    reads = " ".join(shlex.quote(rel(folder)) + "/*.safetensors" for folder in inputs)
    copies = shlex.quote(rel(inputs[0])) + "/*.safetensors"
    o = shlex.quote(rel(out))
    script = f"cat {reads} > /dev/null && mkdir {o} && cp {copies} {o}/ && sync {o}/*"
    return ["sh", "-c", script]


# --------------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------------


def compare(
    inputs: Sequence[Path], terge_out: Path | None, mergekit_out: Path | None
) -> dict[str, Any]:
    sys.path.insert(0, str(SRC_DIR))
    try:
        import terge
    finally:
        sys.path.remove(str(SRC_DIR))
    state_dicts = [load_folder(folder) for folder in inputs]
    reference = terge.merge(state_dicts)
    # Independent of terge: the float64 mean, rounded once to float32.
    by_hand = {
        name: (sum(sd[name].double() for sd in state_dicts) / len(state_dicts)).to(tensor.dtype)
        for name, tensor in reference.items()
    }
    del state_dicts
    result: dict[str, Any] = {}
    got: dict[str, torch.Tensor] = {}
    if terge_out is not None:
        got = load_folder(terge_out)
        unequal = [n for n in reference if n not in got or not torch.equal(got[n], reference[n])]
        result["terge"] = {
            "tensors": len(reference),
            "unequal": len(unequal),
            "first_unequal": unequal[:5],
            "extra_names": sorted(set(got) - set(reference))[:5],
            "exact": not unequal and set(got) == set(reference),
            "equal_to_mean_by_hand": sum(
                n in got and torch.equal(got[n], t) for n, t in by_hand.items()
            ),
        }
    if mergekit_out is not None and mergekit_out.is_dir():
        theirs = load_folder(mergekit_out)
        common = [n for n in reference if n in theirs and theirs[n].shape == reference[n].shape]

        def max_diff(other: dict[str, torch.Tensor]) -> float:
            return max(
                ((theirs[n].double() - other[n].double()).abs().max().item() for n in common),
                default=math.nan,
            )

        result["mergekit"] = {
            "common": len(common),
            "missing": sorted(set(reference) - set(theirs))[:5],
            "extra": sorted(set(theirs) - set(reference))[:5],
            "dtypes": sorted({str(t.dtype) for t in theirs.values()}),
            "max_abs_vs_float64_reference": max_diff(reference),
            "max_abs_vs_terge": max_diff(got) if got and set(common) <= set(got) else math.nan,
            "equal_tensors": sum(torch.equal(theirs[n], reference[n]) for n in common),
        }
    return result


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_adapter_case(
    inputs: Sequence[Path],
    base: Path,
    out: Path,
    args: argparse.Namespace,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``terge.merge([adapter, adapter, model], out=...)`` in a fresh process, memory sampled;
    then the written file compared bit for bit with the same merge in memory."""
    code = (
        f"import terge; terge.merge({[rel(p) for p in inputs]!r}, out={rel(out)!r}, overwrite=True)"
    )
    cmd = [sys.executable, "-c", code]
    evicted = [base, *(p for p in inputs if not (p / "adapter_config.json").exists())]
    result = run_case("terge adapters", cmd, {**terge_env(), **(env or {})}, evicted, out, args)
    if "error" in result:
        return result
    print("  checking the adapter merge ...", file=sys.stderr, flush=True)
    sys.path.insert(0, str(SRC_DIR))
    try:
        import terge

        expected = terge.merge([str(p) for p in inputs])
    finally:
        sys.path.remove(str(SRC_DIR))
    written = load_folder(out)
    result["exact"] = all(torch.equal(written[n], expected[n]) for n in written) and set(
        written
    ) == set(expected)
    return result


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.only == "adapter":
        return run_adapter_benchmark(args)
    machine = machine_info()
    small, large = (SMALL_QUICK, LARGE_QUICK) if args.quick else (SMALL, LARGE)
    prefix = "quick-" if args.quick else ""
    if args.only == "vocabulary":
        return run_vocabulary(args, small, prefix)
    models = {
        "small": [checkpoint(small, s, FILES_DIR / f"{prefix}gpt2-small-{s}") for s in range(3)],
        "large": [checkpoint(large, s, FILES_DIR / f"{prefix}gpt2-2x-{s}") for s in range(3)],
    }
    out = {
        key: FILES_DIR / f"{prefix}out-{key}"
        for key in (
            "terge",
            "mergekit",
            "floor",
            "terge-2x",
            "floor-2x",
            "api",
            "api-2x",
            "none",
            "adapters",
        )
    }
    data: dict[str, Any] = {
        "machine": machine,
        "command": command_line(),
        "revision": source_revision(),
        "repeat": args.repeat,
        "cache": "warm" if args.warm else "cold inputs",
        "models": {
            key: {
                "label": cfg.label,
                "config": asdict(cfg),
                "parameters": cfg.parameters,
                "mib": folder_bytes(models[key][0]) / MIB,
                "files": len(shard_files(models[key][0])),
            }
            for key, cfg in (("small", small), ("large", large))
        },
        "results": {},
        "notes": [],
    }
    results = data["results"]

    if not args.skip_mergekit and not MERGEKIT_YAML.exists():
        if args.setup_mergekit:
            setup_mergekit()
        else:
            data["notes"].append(
                f"mergekit skipped: {MERGEKIT_YAML} not found (run with --setup-mergekit)"
            )
    mergekit = not args.skip_mergekit and MERGEKIT_YAML.exists()
    if mergekit:
        data["mergekit"] = mergekit_version()
    data["terge_mode"] = "—"

    for size, suffix in (("small", ""), ("large", "-2x")):
        inputs = models[size]
        cmd, mode = terge_command(inputs, out["terge" + suffix])
        data["terge_mode"] = mode
        if cmd is None:
            results["terge" + suffix] = {"error": mode}
        else:
            results["terge" + suffix] = run_case(
                "terge" + suffix, cmd, terge_env(), inputs, out["terge" + suffix], args
            )
        if size == "small" and mergekit:
            config_path = FILES_DIR / f"{prefix}mergekit-linear.yml"
            cmd = mergekit_command(inputs, out["mergekit"], config_path)
            results["mergekit"] = run_case(
                "mergekit", cmd, mergekit_env(), inputs, out["mergekit"], args
            )
        results["api" + suffix] = run_api_case(inputs, out["api" + suffix], args)
        cmd = floor_command(inputs, out["floor" + suffix])
        results["floor" + suffix] = run_case(
            "disk floor" + suffix, cmd, dict(os.environ), inputs, out["floor" + suffix], args
        )

    adapters = [
        adapter_folder(small, models["small"][0], s, FILES_DIR / f"{prefix}gpt2-small-lora-{s}")
        for s in range(2)
    ]
    results["adapters"] = run_adapter_case(
        [*adapters, models["small"][1]], models["small"][0], out["adapters"], args
    )

    # Start-up alone (imports, argument parsing), for reading the gaps above.
    if data["terge_mode"] == "CLI":
        cmd = [sys.executable, "-m", "terge", "merge", "--help"]
        results["terge-startup"] = run_case(
            "terge start-up", cmd, terge_env(), [], out["none"], args
        )
    if mergekit:
        cmd = [rel(MERGEKIT_YAML), "--help"]
        results["mergekit-startup"] = run_case(
            "mergekit start-up", cmd, mergekit_env(), [], out["none"], args
        )

    data["vocabulary"] = vocabulary_cases(args, small, prefix, models["small"])

    data["exactness"] = {}
    for size, key in (("small", "terge"), ("large", "terge-2x")):
        mine = None if "error" in results[key] else out[key]
        theirs = None
        if size == "small" and "seconds" in results.get("mergekit", {}):
            theirs = out["mergekit"]
        if mine is None and theirs is None:
            continue
        print(f"  checking the {size} outputs ...", file=sys.stderr, flush=True)
        try:
            data["exactness"][size] = compare(models[size], mine, theirs)
        except Exception as error:
            data["exactness"][size] = {"error": f"{type(error).__name__}: {error}"[:300]}
    for key in out:  # ~2 GB of outputs: not worth keeping
        shutil.rmtree(out[key], ignore_errors=True)
    return data


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc's allocator raises its mmap threshold after freeing a large block, then serves blocks
of that size from its heaps, which keep what they held; a fixed threshold maps and unmaps every
large block, so the peak shows the memory actually live."""


def run_adapter_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """``--only adapter``: the plain terge case and the adapter case, for both model sizes;
    the adapter case again with glibc's mmap threshold fixed (see :data:`FIXED_MMAP`)."""
    prefix = "quick-" if args.quick else ""
    sizes = (
        (("small", SMALL_QUICK, "gpt2-small"), ("large", LARGE_QUICK, "gpt2-2x"))
        if args.quick
        else (("small", SMALL, "gpt2-small"), ("large", LARGE, "gpt2-2x"))
    )
    results: dict[str, Any] = {}
    described: dict[str, Any] = {}
    mode = "—"
    for size, config, stem in sizes:
        models = [checkpoint(config, s, FILES_DIR / f"{prefix}{stem}-{s}") for s in range(3)]
        adapters = [
            adapter_folder(config, models[0], s, FILES_DIR / f"{prefix}{stem}-lora-{s}")
            for s in range(2)
        ]
        out = FILES_DIR / f"{prefix}out-adapter-bench"
        cmd, mode = terge_command(models, out)
        if cmd is not None:
            results[f"{size}:terge"] = run_case("terge", cmd, terge_env(), models, out, args)
        inputs = [*adapters, models[1]]
        results[f"{size}:adapters"] = run_adapter_case(inputs, models[0], out, args)
        results[f"{size}:adapters-fixed"] = run_adapter_case(
            inputs, models[0], out, args, FIXED_MMAP
        )
        shutil.rmtree(out, ignore_errors=True)
        described[size] = {
            "label": config.label,
            "parameters": config.parameters,
            "mib": folder_bytes(models[0]) / MIB,
            "adapter_mib": folder_bytes(adapters[0]) / MIB,
            "largest_adapted_mib": 4 * config.n_embd * config.n_embd * 8 / MIB,
        }
    return {
        "machine": machine_info(),
        "command": command_line(),
        "revision": source_revision(),
        "repeat": args.repeat,
        "cache": "warm" if args.warm else "cold inputs",
        "terge_mode": mode,
        "models": described,
        "rank": ADAPTER_RANK,
        "results": results,
        "notes": [],
        "exactness": {},
        "only": "adapter",
    }


def adapter_report(data: dict[str, Any]) -> str:
    results = data["results"]
    lines = [
        f"## Adapter merges: two rank-{data['rank']} adapters on every linear layer of A, "
        "merged with checkpoint B",
        "",
        f"{data['command']} — {data['cache']}, best of {data['repeat']}; "
        f"{data['machine']['cpu']}, {data['machine']['nproc']} CPUs, {data['machine']['date']}",
        "",
    ]
    rows = []
    for size, model in data["models"].items():
        name = (
            f"{model['label']} ({model['parameters'] / 1e6:.0f}M, {model['mib']:.0f} MiB; "
            f"adapters {model['adapter_mib']:.1f} MiB; largest adapted tensor in float64 "
            f"{model['largest_adapted_mib']:.0f} MiB)"
        )
        for key, label in (
            ("terge", "three checkpoints A, B, C"),
            ("adapters", "adapter 1 over A, adapter 2 over A, B"),
            ("adapters-fixed", "the same, glibc mmap threshold fixed"),
        ):
            result = results.get(f"{size}:{key}", {})
            if "seconds" in result:
                exact = result.get("exact")
                rows.append(
                    [
                        name,
                        label,
                        fmt_seconds(result["seconds"]),
                        fmt_mib(result["anon_peak_mib"]),
                        fmt_mib(result["hwm_mib"]),
                        "—" if exact is None else "bit-exact" if exact else "NOT EXACT",
                    ]
                )
            elif result:
                rows.append([name, label, "error", result["error"][:200], "", ""])
    headers = ["model", "case", "wall s", "peak RssAnon MiB", "VmHWM MiB", "vs in-memory merge"]
    lines.append(markdown_table(headers, rows))
    return "\n".join(lines)


def run_vocabulary(args: argparse.Namespace, small: HFGPT2, prefix: str) -> dict[str, Any]:
    """``--only vocabulary``: the plain merge and the union merge, nothing else."""
    plain = [checkpoint(small, s, FILES_DIR / f"{prefix}gpt2-small-{s}") for s in range(3)]
    return {
        "machine": machine_info(),
        "command": command_line(),
        "revision": source_revision(),
        "repeat": args.repeat,
        "cache": "warm" if args.warm else "cold inputs",
        "vocabulary": vocabulary_cases(args, small, prefix, plain),
    }


def vocabulary_cases(
    args: argparse.Namespace, small: HFGPT2, prefix: str, plain: list[Path]
) -> dict[str, Any]:
    """Peak memory of the plain merge and of the union-vocabulary merge, and the union's rows
    checked against the models' (a token's row is the mean over the models that have it)."""
    inputs = vocabulary_checkpoints(small, prefix)
    results: dict[str, Any] = {"rows_in": [small.vocab_size + len(a) for a in VOCAB_ADDED]}
    for key, folders, extra in (("plain", plain, []), ("union", inputs, ["--vocabulary", "union"])):
        out = FILES_DIR / f"{prefix}out-vocabulary-{key}"
        cmd = [sys.executable, "-m", "terge", "merge", *map(rel, folders), "-o", rel(out)]
        cmd += ["--overwrite", "--quiet", *extra]
        results[key] = run_case(f"terge ({key} vocabulary)", cmd, terge_env(), folders, out, args)
        if key == "union" and "error" not in results[key]:
            results[key]["check"] = check_union(inputs, out, small.vocab_size)
        shutil.rmtree(out, ignore_errors=True)
    return results


def check_union(inputs: Sequence[Path], out: Path, shared: int) -> dict[str, Any]:
    """The union's rows: shared tokens the mean of three, ``<extra_K>`` the mean of the models
    that have it; and ``config.json``'s ``vocab_size``."""
    from safetensors import safe_open

    def wte(folder: Path) -> torch.Tensor:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shard = folder / index["weight_map"]["transformer.wte.weight"]
        with safe_open(shard, "pt") as f:
            return f.get_tensor("transformer.wte.weight").double()

    rows = [wte(folder) for folder in inputs]
    files = sorted(out.glob("*.safetensors"))
    merged = None
    for file in files:
        from safetensors import safe_open as open_

        with open_(file, "pt") as f:
            if "transformer.wte.weight" in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                merged = f.get_tensor("transformer.wte.weight").double()
    assert merged is not None
    want = torch.empty_like(merged)
    want[:shared] = (rows[0][:shared] + rows[1][:shared] + rows[2][:shared]) / 3
    token = shared
    for k in range(max(max(a, default=0) for a in VOCAB_ADDED) + 1):
        held = [r[shared + a.index(k)] for r, a in zip(rows, VOCAB_ADDED) if k in a]
        want[token] = sum(held) / len(held)
        token += 1
    want = want.float().double()
    config = json.loads((out / "config.json").read_text())
    return {
        "rows": merged.shape[0],
        "vocab_size": config["vocab_size"],
        "max_abs_vs_mean_by_hand": (merged - want).abs().max().item(),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def report(data: dict[str, Any]) -> str:
    results = data["results"]

    def seconds(key: str) -> float | None:
        return results.get(key, {}).get("seconds")

    small, large = data["models"]["small"], data["models"]["large"]
    cases = [
        ("terge", f"{small['label']}: terge", "floor"),
        ("mergekit", f"{small['label']}: mergekit", "floor"),
        ("floor", f"{small['label']}: disk floor", "floor"),
        ("api", f"{small['label']}: terge.merge(out=) in Python, start-up excluded", "floor"),
        ("adapters", f"{small['label']}: terge, 2 rank-16 adapters over A + checkpoint B", "floor"),
        ("terge-2x", f"{large['label']}: terge", "floor-2x"),
        ("api-2x", f"{large['label']}: terge.merge(out=) in Python, start-up excluded", "floor-2x"),
        ("floor-2x", f"{large['label']}: disk floor", "floor-2x"),
        ("terge-startup", "start-up only: terge (`merge --help`)", "floor"),
        ("mergekit-startup", "start-up only: mergekit (`--help`)", "floor"),
    ]
    rows, errors = [], []
    for key, label, floor in cases:
        if key not in results:
            continue
        result = results[key]
        if "error" in result:
            errors.append(f"- {label}: {result['error']}")
            rows.append([label, "error", "—", "—", "—", "—"])
            continue
        startup = key.endswith("-startup")
        vs_mk = _ratio(result["seconds"], seconds("mergekit"))
        if startup or key in ("terge-2x", "api", "api-2x"):
            vs_mk = None
        vs_floor = None if startup else _ratio(result["seconds"], seconds(floor))
        rows.append(
            [
                label,
                fmt_seconds(result["seconds"]),
                fmt_ratio(vs_mk),
                fmt_ratio(vs_floor),
                fmt_mib(result.get("anon_peak_mib")),
                fmt_mib(result.get("hwm_mib")),
            ]
        )

    m = data["machine"]
    cache = (
        "inputs evicted from the page cache before every run (read from disk); libraries cached"
        if data["cache"] == "cold inputs"
        else "warm page cache for all cases"
    )
    lines = [
        f"# terge checkpoint-file benchmark — {m['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, "
        f"Python {m['python']}, torch {m['torch']}; load average before the run: "
        f"{m['load_average']}. Command: `{data['command']}`"
        f"; terge at {data['revision']}.",
        "",
        f"Linear merge (equal weights) of 3 random fp32 GPT-2 checkpoints in Hugging Face layout, "
        f"{small['files']} safetensors shards + index each: {small['label']} "
        f"({small['parameters'] / 1e6:.1f}M parameters, {small['mib']:.0f} MiB) and "
        f"{large['label']} ({large['parameters'] / 1e6:.1f}M, {large['mib']:.0f} MiB). "
        f"Whole commands in fresh processes, start-up included, best of {data['repeat']}; "
        f"{cache}. terge runs as: {data['terge_mode']}."
        + (f" {data['mergekit']}, in its own venv." if data.get("mergekit") else ""),
        "",
        markdown_table(
            [
                "case",
                "wall time (s)",
                "vs mergekit",
                "vs disk floor",
                "peak anonymous memory (MiB)",
                "VmHWM (MiB)",
            ],
            rows,
        ),
        "",
        "Commands:",
        *[f"- {key}: `{r['command']}`" for key, r in results.items() if "command" in r],
    ]
    if errors or data["notes"]:
        lines += ["", "Errors and notes:", *errors, *[f"- {n}" for n in data["notes"]]]

    lines += ["", "Exactness:"]
    for size, check in data["exactness"].items():
        label = data["models"][size]["label"]
        if "error" in check:
            lines.append(f"- {label}: error: {check['error']}")
            continue
        t = check.get("terge")
        if t is not None:
            detail = (
                "" if t["exact"] else f"; unequal: {t['first_unequal']}, extra: {t['extra_names']}"
            )
            lines.append(
                f"- {label}: terge vs in-memory float64 terge.merge of the state dicts: exact: "
                f"{'yes' if t['exact'] else 'no'} ({t['tensors']} tensors, {t['unequal']} unequal"
                f"{detail}); equal to (a + b + c) / 3 computed by hand in float64: "
                f"{t['equal_to_mean_by_hand']}/{t['tensors']} tensors"
            )
        if "mergekit" in check:
            k = check["mergekit"]
            lines.append(
                f"- {label}: mergekit ({', '.join(k['dtypes'])}, {k['common']} tensors in common, "
                f"missing {k['missing'] or 'none'}, extra {k['extra'] or 'none'}): max abs "
                f"difference {k['max_abs_vs_float64_reference']:.3g} vs the float64 reference, "
                f"{k['max_abs_vs_terge']:.3g} vs terge's output; "
                f"{k['equal_tensors']}/{k['common']} tensors bit-for-bit equal"
            )

    lines += vocabulary_report(data)
    lines += ["", "Targets:"]
    for check in checks(data):
        lines.append(f"- {check['status']}: {check['target']} (measured: {check['measured']})")
    return "\n".join(lines)


def vocabulary_report(data: dict[str, Any]) -> list[str]:
    """The vocabulary-union section: peak memory beside the plain merge's, and the check."""
    cases = data.get("vocabulary")
    if not cases:
        return []
    rows = []
    for key, label in (("plain", "plain merge (same vocabulary)"), ("union", "--vocabulary union")):
        result = cases.get(key, {})
        if "error" in result:
            rows.append([label, "error: " + result["error"][:200], "—", "—"])
            continue
        rows.append(
            [
                label,
                fmt_seconds(result.get("seconds")),
                fmt_mib(result.get("anon_peak_mib")),
                fmt_mib(result.get("hwm_mib")),
            ]
        )
    lines = [
        "",
        "Vocabulary union (3 checkpoints, "
        + " / ".join(str(n) for n in cases.get("rows_in", ()))
        + f" rows -> {cases.get('union', {}).get('check', {}).get('rows', '?')}):",
        "",
        markdown_table(
            ["case", "wall time (s)", "peak anonymous memory (MiB)", "VmHWM (MiB)"], rows
        ),
        "",
        *[
            f"- {key}: `{r['command']}`"
            for key, r in cases.items()
            if isinstance(r, dict) and "command" in r
        ],
    ]
    check = cases.get("union", {}).get("check")
    if check:
        lines.append(
            f"- union output: {check['rows']} rows, config.json vocab_size "
            f"{check['vocab_size']}, max abs difference from the per-row mean by hand "
            f"{check['max_abs_vs_mean_by_hand']:.3g}"
        )
    return lines


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    results = data["results"]
    out = []

    def add(target: str, ok: bool | None, measured: str) -> None:
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        out.append({"target": target, "status": status, "measured": measured})

    limit_mib = MAX_ANON_BYTES / MIB
    for key in ("terge", "terge-2x"):
        label = data["models"]["small" if key == "terge" else "large"]["label"]
        peak = results.get(key, {}).get("anon_peak_mib")
        add(
            f"{label}: terge peak anonymous memory ≤ 400 MB ({limit_mib:.0f} MiB)",
            None if peak is None else peak <= limit_mib,
            "—" if peak is None else f"{peak:.0f} MiB",
        )
    peak = results.get("adapters", {}).get("anon_peak_mib")
    add(
        f"{data['models']['small']['label']}: terge with adapters, peak anonymous memory ≤ 400 MB",
        None if peak is None else peak <= limit_mib,
        "—" if peak is None else f"{peak:.0f} MiB",
    )
    exact = results.get("adapters", {}).get("exact")
    add(
        "adapter merge written bit-for-bit equal to the in-memory merge",
        exact,
        "—" if exact is None else "exact" if exact else "not exact",
    )
    vs_mk = _ratio(
        results.get("terge", {}).get("seconds"), results.get("mergekit", {}).get("seconds")
    )
    add(
        f"terge wall time ≤ {MAX_VS_MERGEKIT:g}x mergekit's",
        None if vs_mk is None else vs_mk <= MAX_VS_MERGEKIT,
        fmt_ratio(vs_mk),
    )
    for key, floor in (
        ("terge", "floor"),
        ("terge-2x", "floor-2x"),
        ("api", "floor"),
        ("api-2x", "floor-2x"),
    ):
        ratio = _ratio(results.get(key, {}).get("seconds"), results.get(floor, {}).get("seconds"))
        how = "the CLI, start-up included" if key.startswith("terge") else "merge(out=) in Python"
        add(
            f"{data['models']['large' if key.endswith('-2x') else 'small']['label']}: terge "
            f"({how}) within {MAX_VS_FLOOR:g}x of the disk floor",
            None if ratio is None else ratio <= MAX_VS_FLOOR,
            fmt_ratio(ratio),
        )
    for size in ("small", "large"):
        exact = data["exactness"].get(size, {}).get("terge", {}).get("exact")
        add(
            f"{data['models'][size]['label']}: terge's output bit-for-bit equal to the float64 "
            "in-memory merge",
            exact,
            "error" if exact is None else "exact" if exact else "not exact",
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best of)")
    parser.add_argument("--quick", action="store_true", help="tiny checkpoints (smoke test)")
    parser.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit")
    parser.add_argument(
        "--setup-mergekit",
        action="store_true",
        help=f"create {MERGEKIT_VENV.relative_to(REPO_ROOT)} and pip install {MERGEKIT_TORCH} "
        "then mergekit into it, if missing",
    )
    parser.add_argument(
        "--warm", action="store_true", help="leave the inputs in the page cache between runs"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--only",
        choices=("all", "adapter", "vocabulary"),
        default="all",
        help="'adapter': only the adapter case and the plain terge case beside it; "
        "'vocabulary': only the vocabulary-union case and the plain merge beside it",
    )
    args = parser.parse_args(argv)
    args.repeat = max(args.repeat, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = run_benchmark(args)
    if data.get("only") == "adapter":
        print(adapter_report(data))
    elif args.only == "vocabulary":
        print("\n".join(vocabulary_report(data)))
    else:
        data["checks"] = checks(data)
        print(report(data))
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
