"""Stage identity: the code that computes a stage's artifact, hashed so that only a change to it re-runs the stage.

A stage's code closure is its entry module and every project module it reaches by imports (at any depth, imports
inside functions included), plus the Rust sources of rustbpe when the tokenizer trains with it. Three rules make
the closure "the code that computes the artifact" rather than an accident of imports:

- The pipeline and serving packages (nanochat_core.pipeline, nanochat_core.serve) are fenced off: the ML core must
  never import them, and a closure that reaches one is an error (LayerError) naming the module that imported it.
- A few leaf modules compute nothing that ends up in an artifact: progress lines and rank-0 printing, W&B logging,
  and the stage command line (flag parsing, exit codes; the config it parses is in the key by value). They are
  declared here, in NOT_COMPUTING, and left out (with whatever they import).
- Each module is hashed over its normalized source: the syntax tree without docstrings, so comments, docstrings
  and formatting never change a stage's key.

The manifest records the per-module hashes, so the pipeline can say which module changed (`--dry-run`).
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path
from typing import Any

from nanochat_core.fileio import sha256_json

PACKAGE = "nanochat_core"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
RUST_SRC = PACKAGE_ROOT.parent / "rustbpe" / "src"
RUSTBPE = "rustbpe"

FENCED = {
    f"{PACKAGE}.pipeline": "the pipeline package (stages, store, remote checkpoints, presets, launch, report)",
    f"{PACKAGE}.serve": "the serving package (server, batching, request parsing, UI)",
}
NOT_COMPUTING = {
    f"{PACKAGE}.progress": "progress lines and rank-0 printing",
    f"{PACKAGE}.wandb_log": "W&B logging",
    f"{PACKAGE}.stage_cli": "the stage command line (flag parsing, exit codes)",
}


class LayerError(RuntimeError):
    """An ML-core module imports the pipeline or serving machinery; the message names both modules."""


# ---------------------------------------------------------------------------------------------
# normalized source


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:]
    return tree


def _dump(node) -> str:
    """A canonical text of a syntax tree. Empty and None fields are left out, so a Python release that adds a
    field (3.12's type_params) does not change the text of code that does not use it."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_dump(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and value != [] and name != "type_comment"]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_dump(x) for x in node) + "]"
    return repr(node)


def python_source_hash(source: str, filename: str = "<source>") -> str:
    """sha256 of Python source with comments, docstrings and formatting normalized away."""
    tree = _strip_docstrings(ast.parse(source, filename=filename))
    return hashlib.sha256(_dump(tree).encode()).hexdigest()


_RUST_TOKEN = re.compile(
    r'(?P<str>b?r(?P<hashes>#*)".*?"(?P=hashes)|b?"(?:\\.|[^"\\])*")'  # string literals stay as they are
    r"|(?P<char>b?'(?:\\.|[^'\\])')"  # char literals (before lifetimes: 'a' vs 'a)
    r"|(?P<comment>//[^\n]*|/\*.*?\*/)"
    r"|(?P<space>\s+)",
    re.DOTALL,
)


def rust_source_hash(source: str) -> str:
    """sha256 of Rust source without comments (doc comments included) and with runs of whitespace as one space."""
    def keep(m: re.Match) -> str:
        if m.group("comment") or m.group("space"):
            return " "
        return m.group(0)

    text = " ".join(_RUST_TOKEN.sub(keep, source).split())
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the closure


def module_file(module: str, root: Path = PACKAGE_ROOT) -> Path | None:
    """The source file of a project module, or None (e.g. `from pkg import name` where name is not a module)."""
    parts = module.split(".")[1:]
    if not parts:
        return root / "__init__.py"
    rel = Path(*parts)
    for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Project modules (and 'rustbpe') that a source file imports, anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".") or n == RUSTBPE)
    return found


def _fence(module: str) -> str | None:
    for prefix, what in FENCED.items():
        if module == prefix or module.startswith(prefix + "."):
            return what
    return None


def closure(entry_module: str, root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """{module: the module that first imported it} for every module that computes the stage of `entry_module`
    (the entry maps to itself). Raises LayerError when a module of the closure imports a fenced package."""
    found = {entry_module: entry_module}
    todo = [entry_module]
    while todo:
        module = todo.pop()
        if module == RUSTBPE:
            continue
        path = module_file(module, root)
        if path is None:
            continue
        for name in sorted(imported_modules(path, module)):
            what = _fence(name)
            if what is not None:
                raise LayerError(f"{module} imports {name}, part of {what}: the ML core never imports the pipeline "
                                 f"or serving packages (a stage's identity would then depend on them); move what "
                                 f"it needs into the core or a leaf utility (DESIGN.md, Layers)")
            if name in found or name in NOT_COMPUTING or name == PACKAGE:
                continue
            if name != RUSTBPE and module_file(name, root) is None:
                continue  # `from nanochat_core.x import some_function`: x itself is counted
            found[name] = module
            todo.append(name)
    return dict(sorted(found.items()))


def import_chain(entry_module: str, module: str, found: dict[str, str]) -> list[str]:
    """entry -> ... -> module: how the closure reached `module` (for messages)."""
    chain = [module]
    while chain[-1] != entry_module:
        chain.append(found[chain[-1]])
    return chain[::-1]


def module_hashes(entry_module: str, root: Path = PACKAGE_ROOT, rust_src: Path = RUST_SRC) -> dict[str, str]:
    """{module: normalized-source hash} over the stage's closure; rustbpe counts as its Rust sources."""
    hashes = {}
    for module in closure(entry_module, root):
        if module == RUSTBPE:
            for rs in sorted(rust_src.glob("*.rs")) if rust_src.is_dir() else []:
                hashes[f"rustbpe/src/{rs.name}"] = rust_source_hash(rs.read_text())[:16]
            continue
        path = module_file(module, root)
        hashes[module] = python_source_hash(path.read_text(), str(path))[:16]
    return hashes


def code_version(hashes: dict[str, str]) -> str:
    """One hash of a stage's per-module hashes: the code part of its cache key."""
    return sha256_json(sorted(hashes.items()))[:16]


def changed_modules(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Modules whose code differs between two closures (added, removed or edited), sorted."""
    return sorted(m for m in set(old) | set(new) if old.get(m) != new.get(m))


def cache_key(stage: str, config: dict[str, Any], upstream: dict[str, str], code: str) -> str:
    """A stage's key: what it is (stage, config), what it reads (upstream digests) and the code that computes it."""
    return sha256_json({"stage": stage, "config": config, "upstream": upstream, "code": code})[:20]
