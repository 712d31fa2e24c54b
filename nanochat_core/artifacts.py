"""Content-addressed stage artifacts: the store is the cache.

An artifact is a directory `<store>/<stage>/<cache key>/` whose MANIFEST.json is written last. The
manifest lists every file (size, sha256), the stage, its config, the upstream digests, the code version
and headline metrics. A directory without a manifest is incomplete: readers ignore it and the stage
resumes in it (training keeps its checkpoints there) or replaces it.

The cache key hashes (stage, config, upstream digests, code version). The code version hashes the source
of every nanochat_core module the stage's entry module imports (transitively), plus the Rust sources
when the stage uses rustbpe, so editing the model re-runs training but editing the server does not.

Stores are local paths or any fsspec URL (s3://...). Stages always compute in a local directory; for a
remote store `publish` uploads the files and then the manifest, so no reader sees half an artifact.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
INPUTS = ".inputs.json"  # a stage's upstream refs, in its work dir while it computes (hidden: not in the manifest)
CHECKPOINT_FILES = ("model.pt", "meta.json")  # what loading a model reads
PACKAGE_ROOT = Path(__file__).resolve().parent
RUST_SRC = PACKAGE_ROOT.parent / "rustbpe" / "src"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or damaged; the message says which file and why."""


@dataclass(frozen=True)
class ArtifactRef:
    """Where a stage's output lives (any fsspec URI) and the sha256 of its MANIFEST.json."""

    uri: str
    digest: str

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> ArtifactRef:
        return cls(uri=d["uri"], digest=d["digest"])


# ---------------------------------------------------------------------------------------------
# hashing and keys


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    if not parts:
        return PACKAGE_ROOT / "__init__.py"
    rel = Path(*parts)
    for candidate in (PACKAGE_ROOT / rel.with_suffix(".py"), PACKAGE_ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """nanochat_core modules (and 'rustbpe') that a source file imports."""
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
        for name in names:
            if name.startswith("nanochat_core") or name == "rustbpe":
                found.add(name)
    return found


def code_version(entry_module: str) -> str:
    """Hash of the source of `entry_module` and every nanochat_core module it reaches by imports."""
    seen: set[str] = set()
    files: dict[str, str] = {}
    todo = [entry_module]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module == "rustbpe":
            for rs in sorted(RUST_SRC.glob("*.rs")) if RUST_SRC.is_dir() else []:
                files[f"rustbpe/{rs.name}"] = sha256_file(rs)
            continue
        path = _module_file(module)
        if path is None:
            continue  # `from pkg import name` where name is not a module
        files[module] = sha256_file(path)
        todo.extend(_imported_modules(path, module))
    return sha256_json(sorted(files.items()))[:16]


def cache_key(stage: str, config: dict[str, Any], upstream: dict[str, str], code: str) -> str:
    return sha256_json({"stage": stage, "config": config, "upstream": upstream, "code": code})[:20]


# ---------------------------------------------------------------------------------------------
# stores


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def join_uri(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(local_path(base).joinpath(*parts))


def filesystem(uri: str):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(uri)
    return fs


def check_store(store: str) -> None:
    """Fail early, with the store named, if the store cannot be written."""
    if is_remote(store):
        fs = filesystem(store)
        probe = join_uri(store, f".write-probe-{os.getpid()}")
        try:
            fs.pipe(probe, b"ok")
            fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - any backend error means "not writable"
            raise ArtifactError(f"store {store} is not writable: {type(e).__name__}: {e}") from e
        return
    path = local_path(store)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ArtifactError(f"store {store} is not writable: {e}") from e


def staging_dir(store: str, stage: str, key: str) -> Path:
    """The local directory a stage computes in: the final place for a local store."""
    if not is_remote(store):
        return local_path(store) / stage / key
    root = Path(os.environ.get("NANOCHAT_STAGING", Path.home() / ".cache" / "nanochat" / "staging"))
    return root / hashlib.sha256(store.encode()).hexdigest()[:12] / stage / key


# ---------------------------------------------------------------------------------------------
# manifests


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_files(root: Path) -> list[str]:
    """Relative paths of the files an artifact holds (hidden temp files and the manifest excluded)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return out


def write_manifest(
    local_dir: str | Path,
    stage: str,
    config: dict[str, Any],
    upstream: dict[str, str],
    code: str,
    metrics: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
) -> str:
    """Hash every file under local_dir and write MANIFEST.json last. Returns the manifest digest.

    `upstream` maps each input flag to its manifest digest (part of the identity); `inputs` maps it to the
    upstream URI (where to find e.g. the tokenizer of a model; not part of the identity)."""
    root = Path(local_dir)
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in list_files(root)}
    manifest = {
        "stage": stage,
        "config": config,
        "upstream": upstream,
        "inputs": inputs or {},
        "code_version": code,
        "metrics": metrics or {},
        "files": files,
    }
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    atomic_write_bytes(root / MANIFEST, data)
    return hashlib.sha256(data).hexdigest()


def read_artifact_file(uri: str, name: str) -> bytes | None:
    """The bytes of one file of an artifact (local or remote), None when it is not there."""
    target = join_uri(uri, name)
    if is_remote(uri):
        fs = filesystem(uri)
        return fs.cat_file(target) if fs.exists(target) else None
    p = local_path(target)
    return p.read_bytes() if p.is_file() else None


def read_manifest_bytes(uri: str) -> bytes | None:
    return read_artifact_file(uri, MANIFEST)


def read_manifest(uri: str) -> dict[str, Any]:
    data = read_manifest_bytes(uri)
    if data is None:
        raise ArtifactError(f"artifact {uri} is incomplete: it has no {MANIFEST}")
    return json.loads(data)


def verify_artifact(uri: str, digest: str | None = None, deep: bool = False) -> ArtifactRef:
    """Check an artifact against its manifest (sizes always, sha256 too when deep). Raises ArtifactError."""
    data = read_manifest_bytes(uri)
    if data is None:
        raise ArtifactError(f"artifact {uri} is incomplete: it has no {MANIFEST}")
    actual = hashlib.sha256(data).hexdigest()
    if digest is not None and actual != digest:
        raise ArtifactError(f"artifact {uri}: manifest digest {actual[:12]} differs from the expected {digest[:12]}")
    manifest = json.loads(data)
    fs = filesystem(uri) if is_remote(uri) else None
    for rel, info in manifest["files"].items():
        target = join_uri(uri, rel)
        if fs is not None:
            if not fs.exists(target):
                raise ArtifactError(f"artifact {uri}: file {rel} is missing")
            size = fs.size(target)
        else:
            p = local_path(target)
            if not p.is_file():
                raise ArtifactError(f"artifact {uri}: file {rel} is missing")
            size = p.stat().st_size
        if size != info["size"]:
            raise ArtifactError(f"artifact {uri}: file {rel} has {size} bytes, the manifest says {info['size']}")
        if deep:
            actual_sha = hashlib.sha256(fs.cat_file(target)).hexdigest() if fs else sha256_file(local_path(target))
            if actual_sha != info["sha256"]:
                raise ArtifactError(f"artifact {uri}: file {rel} is corrupt (sha256 mismatch)")
    return ArtifactRef(uri=uri, digest=actual)


def checkpoint_ref(path: str | Path) -> ArtifactRef:
    """A reference to a model directory without a manifest (a training checkpoint), by the content of the
    files loading it reads: evaluating the same weights twice gives the same key, wherever they lie."""
    p = Path(path)
    missing = [f for f in CHECKPOINT_FILES if not (p / f).is_file()]
    if missing:
        raise ArtifactError(f"{p} is not a model checkpoint: it has no {', '.join(missing)}")
    return ArtifactRef(str(p.resolve()), sha256_json({f: sha256_file(p / f) for f in CHECKPOINT_FILES}))


def verify_input(ref: ArtifactRef) -> None:
    """Deep check of an upstream reference before a stage reads it: an artifact against its manifest, a
    checkpoint (a local model directory without one) against its content digest."""
    if not is_remote(ref.uri) and read_manifest_bytes(ref.uri) is None and local_path(ref.uri).is_dir():
        if checkpoint_ref(local_path(ref.uri)).digest != ref.digest:
            raise ArtifactError(f"checkpoint {ref.uri} changed since it was referenced (content digest mismatch)")
        return
    verify_artifact(ref.uri, ref.digest, deep=True)


def find_artifact(store: str, stage: str, key: str, deep: bool = False) -> ArtifactRef | None:
    """The completed, intact artifact for this key, or None (missing, incomplete or damaged)."""
    uri = join_uri(store, stage, key)
    try:
        return verify_artifact(uri, deep=deep)
    except ArtifactError:
        return None


def publish(local_dir: str | Path, uri: str) -> None:
    """Upload a finished local artifact to a remote store: every file first, the manifest last."""
    if not is_remote(uri):
        return
    fs = filesystem(uri)
    root = Path(local_dir)
    if fs.exists(join_uri(uri, MANIFEST)):
        fs.rm(join_uri(uri, MANIFEST))  # a replaced artifact is incomplete while its files change
    for rel in list_files(root):
        fs.put_file(str(root / rel), join_uri(uri, rel))
    fs.put_file(str(root / MANIFEST), join_uri(uri, MANIFEST))


def materialize(ref: ArtifactRef, cache_root: str | Path | None = None) -> Path:
    """A local directory holding the artifact (downloaded and hash-checked if the store is remote)."""
    if not is_remote(ref.uri):
        return local_path(ref.uri)
    root = Path(cache_root or os.environ.get("NANOCHAT_CACHE", Path.home() / ".cache" / "nanochat" / "artifacts"))
    dest = root / ref.digest[:20]
    if (dest / MANIFEST).is_file():
        return dest
    fs = filesystem(ref.uri)
    manifest_bytes = fs.cat_file(join_uri(ref.uri, MANIFEST))
    if hashlib.sha256(manifest_bytes).hexdigest() != ref.digest:
        raise ArtifactError(f"artifact {ref.uri} changed: its manifest no longer matches digest {ref.digest[:12]}")
    manifest = json.loads(manifest_bytes)
    tmp = Path(tempfile.mkdtemp(dir=root.mkdir(parents=True, exist_ok=True) or root, prefix=".dl-"))
    try:
        for rel, info in manifest["files"].items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(join_uri(ref.uri, rel), str(tmp / rel))
            if sha256_file(tmp / rel) != info["sha256"]:
                raise ArtifactError(f"artifact {ref.uri}: downloaded file {rel} is corrupt (sha256 mismatch)")
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
