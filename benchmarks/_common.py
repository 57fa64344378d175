"""Reusable helpers for terge's benchmarks.

- :class:`GPT2Config` / :func:`build_gpt2` / :func:`build_models`: GPT-2-shaped ``nn.Module``s with
  deterministic random weights, built quickly (meta-device construction, then ``normal_`` fills).
- :func:`measure`: wall time and extra peak resident memory (Linux ``VmHWM``) of one call.
- :func:`install_terge_011` / :func:`run_worker`: run a benchmark case in a fresh subprocess with a
  chosen ``PYTHONPATH`` (e.g. PyPI's terge 0.1.1 or this checkout's ``src/``) and get its JSON back.
- :func:`markdown_table`, :func:`machine_info`: report formatting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SRC_DIR = REPO_ROOT / "src"
CACHE_DIR = BENCH_DIR / ".cache"
TERGE_011_DIR = CACHE_DIR / "terge011"

MIB = 1 << 20
RESULT_MARKER = "@@BENCH_RESULT@@ "


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2-like model (defaults: GPT-2 small, 124M parameters)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12


GPT2_SMALL = GPT2Config()
GPT2_TINY = GPT2Config(vocab_size=8192, n_positions=256, n_embd=256, n_layer=2)


class Attention(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)


class Block(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)


class GPT2Like(nn.Module):
    """Parameters named and shaped like Hugging Face's ``GPT2Model`` (``Linear`` for ``Conv1D``)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config.n_embd) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)


class Layer(nn.Module):
    def __init__(self, hidden: int, mlp: int, kv: int) -> None:
        super().__init__()
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, kv, bias=False)
        self.v = nn.Linear(hidden, kv, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate = nn.Linear(hidden, mlp, bias=False)
        self.up = nn.Linear(hidden, mlp, bias=False)
        self.down = nn.Linear(mlp, hidden, bias=False)
        self.norm1 = nn.Parameter(torch.ones(hidden))
        self.norm2 = nn.Parameter(torch.ones(hidden))


class LlamaShaped(nn.Module):
    """A Llama-shaped model (untied head, ``kv`` wide key/value projections), no forward."""

    def __init__(self, layers: int, vocab: int, hidden: int, mlp: int, kv: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden, mlp, kv) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(hidden))
        self.head = nn.Linear(hidden, vocab, bias=False)


def num_parameters(config: GPT2Config) -> int:
    """Number of parameters of :func:`build_gpt2` for ``config`` (allocates nothing)."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT2Like(config).parameters())


def build_gpt2(
    config: GPT2Config = GPT2_SMALL, seed: int = 0, dtype: torch.dtype = torch.float32
) -> GPT2Like:
    """A GPT-2-shaped module whose parameters are N(0, 0.02) draws determined by ``seed``.

    Built on the meta device and then filled in place, so no time is spent on default inits.
    """
    with torch.device("meta"):
        model = GPT2Like(config)
    model.to_empty(device="cpu")
    model.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return model


def build_models(
    n: int = 3, config: GPT2Config = GPT2_SMALL, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[GPT2Like]:
    """``n`` GPT-2-shaped modules with different deterministic weights (seeds ``seed + i``)."""
    return [build_gpt2(config, seed + i, dtype) for i in range(n)]


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Time and peak memory
# --------------------------------------------------------------------------------------------------


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``).

    Without this, memory freed by an earlier call can stay resident in malloc's heap (glibc raises
    its mmap threshold up to 32 MiB after large frees), inflating the RSS baseline of the next
    measurement and hiding that call's real peak.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class Measurement:
    seconds: float
    extra_peak_mib: float | None  # VmHWM during the call minus VmRSS just before; None if unknown


def measure(fn: Callable[[], Any]) -> Measurement:
    """Time one call of ``fn`` and the extra peak resident memory it needed.

    The result of ``fn`` is kept alive until ``VmHWM`` has been read (so a returned copy counts)
    and then dropped. Freed heap memory is returned to the OS first (:func:`release_free_memory`).
    """
    release_free_memory()
    supported = reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    hwm = _status_kib("VmHWM")
    del result
    gc.collect()
    extra = None
    if supported and hwm is not None and rss_before is not None:
        extra = max(hwm - rss_before, 0) / 1024
    return Measurement(seconds, extra)


def best_of(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> dict[str, Any]:
    """``warmup`` untimed calls, then ``repeat`` measured ones: best time, worst extra peak."""
    for _ in range(warmup):
        result = fn()
        del result
    runs = [measure(fn) for _ in range(repeat)]
    peaks = [r.extra_peak_mib for r in runs if r.extra_peak_mib is not None]
    return {
        "seconds": min(r.seconds for r in runs),
        "all_seconds": [r.seconds for r in runs],
        "extra_peak_mib": max(peaks) if peaks else None,
    }


# --------------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------------


def install_terge_011(target: Path = TERGE_011_DIR) -> Path:
    """``pip install --no-deps --target`` terge 0.1.1 from PyPI once; returns the folder."""
    if not (target / "terge" / "__init__.py").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(target),
                "terge==0.1.1",
            ],
            check=True,
        )
    return target


def emit_result(result: dict[str, Any]) -> None:
    """Called by a worker subprocess to hand its result to :func:`run_worker`."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_worker(
    script: Path | str,
    args: Sequence[str],
    pythonpath: Sequence[Path | str] = (),
    timeout: float = 600,
) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process with exactly ``pythonpath`` on PYTHONPATH.

    Returns the dict the worker passed to :func:`emit_result`, or ``{"error": ...}``.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env.setdefault("PYTHONHASHSEED", "0")
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return {"error": tail[0][:300]}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = None
    try:
        with open("/proc/meminfo") as meminfo:
            mem_kib = int(meminfo.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / (1 << 20), 1) if mem_kib else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def command_line() -> str:
    """The command that started this process, relative to the repository root when possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_str = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_str = str(script)
    return " ".join(["python", script_str, *sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(row) for row in cells[1:]]
    return "\n".join(lines)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 0.01:
        return f"{seconds:.5f}"  # a GPU's milliseconds keep three digits
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def fmt_ratio(ratio: float | None, suffix: str = "x") -> str:
    if ratio is None:
        return "—"
    return f"{ratio:.1f}{suffix}" if ratio >= 10 else f"{ratio:.2f}{suffix}"


def fmt_mib(mib: float | None) -> str:
    return "—" if mib is None else f"{mib:.0f}"


def source_revision() -> str:
    """The checkout's commit, marked when ``src/`` has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted changes in src/" if dirty else "")
