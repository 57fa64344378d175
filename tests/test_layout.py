"""The guard of terge's layout: one house, its wings on floors, imports only downwards.

Every module of ``src/terge`` belongs to a *wing*: a top-level module (``terge.plan`` is the wing
``plan``) or a subpackage with everything in it (``terge.io.reading`` is in the wing ``io``). The
wings stand on floors, lowest first:

====  =======================================  ==============================================
floor wings                                    what they are
====  =======================================  ==============================================
0     errors, _version                         the exceptions; the one version string
1     patterns, layers, sharding, kernels,     name patterns; block indices; DTensors; the
      lowrank                                  hot loops; truncated SVD into LoRA factors
                                               (pure float64 arithmetic)
2     layerwise, io, families                  per-layer values; reading and writing
                                               checkpoints; the newer methods' arithmetic
                                               (pure tensor functions, below the registry)
3     sources, methods, lineage, vocabulary    models as named tensors; the merge methods;
                                               the lineage record; tokenizers read and
                                               vocabularies aligned by token
4     types, plan, modelcard                   merge()'s argument types; the plan (what
                                               happens to every tensor); a merge's README.md
                                               model card, written from its lineage
5     execute, digests                         running a plan in memory; hashing what ran
6     output, averaging, lora                  running a plan into a checkpoint folder; a
                                               running average in the training loop; two
                                               models' difference (or a plan run one tensor at
                                               a time) written as a PEFT LoRA adapter
7     merge, audit, policy, inspection,        merge(); recomputing and checking a lineage;
      integrations, stacking                   the rules CI holds a lineage to; measuring
                                               task vectors before a merge; the Lightning and
                                               transformers callbacks; stack(), a model built
                                               from slices of others' blocks (plans its merged
                                               slices, writes like output)
8     report, plots                            audit results as text, JSON and JUnit; the
                                               pictures (matplotlib, optional)
9     cli                                      the ``terge`` command and its recipes
====  =======================================  ==============================================

A module imports only from its own wing or from wings on lower floors: never up, and never
sideways (wings on one floor know nothing of each other). Three more rules:

* no module imports another module's private names (``from .x import _y``); a private
  *module* (``_version``, the compiled ``kernels._fastloop``) is the package's own and may be
  imported;
* no module imports from the package's face (``from terge import ...``, ``import terge``,
  ``from . import __version__`` in a top-level module): the face (``__init__.py``) imports the
  house, not the other way round. The face itself and ``__main__.py`` stand outside the floors;
  so does ``terge.examples``, code written as a user would write it (``import terge``);
* every module is on a floor: a new wing has to be placed here, with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "terge"

FLOORS: list[set[str]] = [
    {"errors", "_version"},
    {"patterns", "layers", "sharding", "kernels", "lowrank"},
    {"layerwise", "io", "families"},
    {"sources", "methods", "lineage", "vocabulary"},
    {"types", "plan", "modelcard"},
    {"execute", "digests"},
    {"output", "averaging", "lora"},
    {"merge", "audit", "policy", "inspection", "integrations", "stacking"},
    {"report", "plots"},
    {"cli"},
]
FLOOR = {wing: level for level, wings in enumerate(FLOORS) for wing in wings}
OUTSIDE = {"__init__", "__main__", "examples"}
"""Wings on no floor: the face, ``python -m terge``, and the examples (users of the face)."""


def module_name(path: Path) -> str:
    """``terge.io.reading`` for ``src/terge/io/reading.py``; a package is its ``__init__``."""
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def exists(module: str) -> bool:
    """Whether ``module`` is a module or package of terge (source, stub or compiled)."""
    relative = Path(*module.split("."))
    folder = SOURCE.parent / relative
    return (
        (folder / "__init__.py").is_file()
        or folder.with_suffix(".py").is_file()
        or folder.with_suffix(".pyi").is_file()
        or any(folder.parent.glob(f"{folder.name}.*.so"))
        or any(folder.parent.glob(f"{folder.name}.*.pyd"))
    )


def rebound(package: str) -> set[str]:
    """Names a package's ``__init__`` binds to something other than its submodule of that name
    (``from .merge import merge``): importing such a name from the package takes the face's."""
    init = SOURCE.parent / Path(*package.split(".")) / "__init__.py"
    if not init.is_file():
        return set()
    names = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or node.level != 1):
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.asname or alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def wing(module: str) -> str:
    """The wing of a module: ``io`` for ``terge.io.reading``, ``__init__`` for the face."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def imports(path: Path, added: str = "") -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` for every import in the file (lazy ones inside functions and
    ``TYPE_CHECKING`` blocks too); relative imports resolved, ``names`` empty for ``import m``."""
    module = module_name(path)
    package = module if is_package(path) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() + added, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def violations(added: dict[str, str] | None = None) -> list[str]:
    """Every import that breaks a rule of the module's docstring, as ``file:line: why``;
    ``added`` appends code to files (``{"plan.py": "from .merge import merge"}``)."""
    problems = []
    for module, path in modules().items():
        here = wing(module)
        where = path.relative_to(SOURCE.parent)
        if here not in OUTSIDE and here not in FLOOR:
            problems.append(f"{where}: the wing {here!r} is on no floor; place it in FLOORS")
            continue
        extra = (added or {}).get(path.relative_to(SOURCE).as_posix(), "")
        for line, target, names in imports(path, "\n" + extra):
            if target != "terge" and not target.startswith("terge."):
                continue  # the standard library, torch, ...
            at = f"{where}:{line}"
            # a name that is a submodule is an import of that module, not of the package's face
            submodules = [n for n in names if exists(f"{target}.{n}") and n not in rebound(target)]
            plain = [n for n in names if n not in submodules]
            for name in plain:
                if name.startswith("_") and not name.startswith("__"):
                    problems.append(f"{at}: imports the private name {name!r} from {target}")
            if here in OUTSIDE:
                continue
            if target == "terge" and (plain or not names):
                problems.append(f"{at}: imports from the package's face (terge/__init__.py)")
                continue
            targets = [f"{target}.{n}" for n in submodules]
            targets += [target] if plain or not names else []
            for imported in targets:
                there = wing(imported)
                if there == here:
                    continue
                if there not in FLOOR:
                    problems.append(f"{at}: imports {imported}, which is on no floor")
                elif FLOOR[there] >= FLOOR[here]:
                    way = "sideways" if FLOOR[there] == FLOOR[here] else "up"
                    problems.append(
                        f"{at}: {here} (floor {FLOOR[here]}) imports {imported} "
                        f"({there}, floor {FLOOR[there]}): {way}"
                    )
    return problems


def test_imports_keep_to_the_floors():
    assert violations() == []


def test_every_floor_names_existing_wings():
    present = {wing(module) for module in modules()}
    assert set(FLOOR) <= present, set(FLOOR) - present


# --- the guard guards: each rule catches a bad import ---------------------------------------------


@pytest.mark.parametrize(
    ("file", "code", "message"),
    [
        ("plan.py", "from .merge import merge\n", "plan (floor 4) imports terge.merge"),
        ("plan.py", "from . import execute\n", "imports terge.execute (execute, floor 5): up"),
        ("methods.py", "from .lineage import Lineage\n", "(lineage, floor 3): sideways"),
        ("io/reading.py", "from ..sources import Source\n", "io (floor 2) imports"),
        ("merge.py", "from .plan import _Weights\n", "the private name '_Weights'"),
        ("merge.py", "from . import __version__\n", "from the package's face"),
        ("audit.py", "import terge\n", "from the package's face"),
        ("sources.py", "import terge.plan\n", "sources (floor 3) imports terge.plan"),
        ("errors.py", "def f():\n    from .io import load\n", "errors (floor 0) imports"),
        ("cli/commands.py", "from terge import merge\n", "from the package's face"),
        ("cli/commands.py", "from .. import merge\n", "from the package's face"),  # the function
        ("cli/commands.py", "from .. import lineage\n", None),  # the module terge.lineage
        ("cli/commands.py", "from ..io import reading\n", None),  # a module of a lower wing
        ("io/writing.py", "from .sizes import parse_size\n", None),  # its own wing
        ("kernels/fastloop.py", "from . import _fastloop\n", None),  # a private module: allowed
    ],
)
def test_the_guard_catches(file, code, message):
    found = violations({file: code})
    if message is None:
        assert found == []
    else:
        assert len(found) == 1, found
        assert found[0].startswith(f"terge/{file}:")
        assert message in found[0]
