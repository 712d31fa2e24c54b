"""Content-addressed stage artifacts: the store is the cache.

An artifact is a directory `<store>/<stage>/<cache key>/` whose MANIFEST.json is written last. The
manifest lists every file (size, sha256), the stage, its config, the upstream digests, the code version
and headline metrics. A directory without a manifest is incomplete: readers ignore it and the stage
resumes in it (training keeps its checkpoints there) or replaces it.

The cache key hashes (stage, config, upstream digests, code version); nanochat_core.pipeline.identity says
which code that is.

Stores are local paths or any fsspec URL (s3://...). Stages always compute in a local directory; for a
remote store `publish` uploads the files and then the manifest, so no reader sees half an artifact, and
`materialize` gives a stage a local, sha256-checked copy of its inputs. S3 endpoint and credentials come from
the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat_core.fileio import atomic_write_bytes, sha256_file, sha256_json

MANIFEST = "MANIFEST.json"
INPUTS = ".inputs.json"  # a stage's upstream refs, in its work dir while it computes (hidden: not in the manifest)
CHECKPOINT_FILES = ("model.pt", "meta.json")  # what loading a model reads


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
# stores


class StoreError(ArtifactError):
    """A remote store could not be reached, or refused a read or a write; the message names the store."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def join_uri(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(local_path(base).joinpath(*parts))


def store_of(uri: str) -> str:
    """The store an artifact (<store>/<stage>/<key>) or a checkpoint in it (.../checkpoints/step_N) belongs to."""
    parts = uri.rstrip("/").split("/")
    depth = 4 if len(parts) >= 2 and parts[-2] == "checkpoints" else 2
    return "/".join(parts[:-depth])


def relative_to_store(uri: str, store: str) -> str:
    """`uri` as a path inside `store` ("tokenizer/<key>") when it lies there, else unchanged: what manifests record,
    so that a store can be moved or copied and still name its own artifacts."""
    root = store.rstrip("/") + "/"
    if uri.startswith(root):
        return uri[len(root):]
    return uri if is_remote(uri) else str(local_path(uri).resolve())  # elsewhere: a full path, never a relative one


def resolve_in_store(uri: str, store: str) -> str:
    """Inverse of relative_to_store: a recorded path inside the store as a full URI (absolute ones unchanged)."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return join_uri(store, *uri.split("/"))


def storage_options(uri: str, secrets: bool = True) -> dict[str, Any]:
    """fsspec options for a remote store. For S3, endpoint and keys come from the standard AWS variables; they
    are passed explicitly so that fsspec's cached filesystem object follows them when they change. Listings are
    never cached: a stale listing would hide a manifest that another process has just written."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    env = os.environ.get
    opts = {"endpoint_url": env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")}
    if secrets:
        opts.update(key=env("AWS_ACCESS_KEY_ID"), secret=env("AWS_SECRET_ACCESS_KEY"), token=env("AWS_SESSION_TOKEN"))
    return {"use_listings_cache": False, **{k: v for k, v in opts.items() if v}}


def filesystem(uri: str):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs


@contextmanager
def store_errors(uri: str, doing: str):
    """Turn a backend failure (network, credentials, permissions) into a StoreError naming the store. A missing
    object stays FileNotFoundError: callers decide what absence means."""
    try:
        yield
    except (ArtifactError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors share no base class
        raise StoreError(f"store {uri}: {doing} failed: {type(e).__name__}: {e}") from e


def check_store(store: str) -> None:
    """Fail early, with the store named, if the store cannot be written (nothing is left behind)."""
    if is_remote(store):
        probe = join_uri(store, f".write-probe-{os.getpid()}")
        try:
            fs = filesystem(store)
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - any backend error means "not writable"
            raise StoreError(f"store {store} is not writable: {type(e).__name__}: {e}") from e
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


def default_cache_root() -> Path:
    """Where remote artifacts are downloaded to, one directory per manifest digest."""
    return Path(os.environ.get("NANOCHAT_CACHE", Path.home() / ".cache" / "nanochat" / "artifacts"))


# ---------------------------------------------------------------------------------------------
# manifests




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
    code_modules: dict[str, str] | None = None,
    reused: dict[str, str] | None = None,
) -> str:
    """Hash every file under local_dir and write MANIFEST.json last. Returns the manifest digest.

    `upstream` maps each input flag to its manifest digest (part of the identity); `inputs` maps it to the
    upstream's place (where to find e.g. the tokenizer of a model; store-relative, see relative_to_store);
    `code_modules` the per-module hashes of the stage's code (so a later run can say which module changed).
    `reused` names the upstream artifacts pinned with --reuse that this one is built on (recorded only when any).
    Nothing in it says when or where the stage ran: the same result gives the same digest."""
    root = Path(local_dir)
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in list_files(root)}
    manifest = {
        "stage": stage,
        "config": config,
        "upstream": upstream,
        "inputs": inputs or {},
        "code_version": code,
        "code_modules": code_modules or {},
        **({"reused": reused} if reused else {}),
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
        with store_errors(uri, f"reading {name}"):
            try:
                return filesystem(uri).cat_file(target)
            except FileNotFoundError:
                return None
    p = local_path(target)
    return p.read_bytes() if p.is_file() else None


def read_manifest_bytes(uri: str) -> bytes | None:
    return read_artifact_file(uri, MANIFEST)


def parse_manifest(data: bytes, uri: str) -> dict[str, Any]:
    """A manifest's record, checked for shape: a damaged one (not JSON, not an object, no file list) is an
    ArtifactError naming the file, like any other damage, never a raw JSON or type error."""
    where = join_uri(uri, MANIFEST)
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where} is damaged: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} is damaged: a JSON {type(manifest).__name__}, not a manifest object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)
            for info in files.values()):
        raise ArtifactError(f"{where} is damaged: no valid 'files' list (name -> size, sha256)")
    return manifest


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of an artifact; ArtifactError naming it when it is missing or damaged."""
    data = read_manifest_bytes(uri)
    if data is None:
        raise ArtifactError(f"artifact {uri} is incomplete: it has no {MANIFEST}")
    return parse_manifest(data, uri)


def manifest_or_none(uri: str, warn: bool = True) -> dict[str, Any] | None:
    """The manifest, or None when it is missing or damaged (a damaged one is reported once on stderr when `warn`)."""
    try:
        return read_manifest(uri)
    except StoreError:
        raise
    except ArtifactError as e:
        if warn and read_manifest_bytes(uri) is not None:
            print(f"warning: {e}; treating the artifact as missing", file=sys.stderr, flush=True)
        return None


def verify_artifact(uri: str, digest: str | None = None, deep: bool = False) -> ArtifactRef:
    """Check an artifact against its manifest (sizes always, sha256 too when deep). Raises ArtifactError."""
    data = read_manifest_bytes(uri)
    if data is None:
        raise ArtifactError(f"artifact {uri} is incomplete: it has no {MANIFEST}")
    actual = hashlib.sha256(data).hexdigest()
    if digest is not None and actual != digest:
        raise ArtifactError(f"artifact {uri}: manifest digest {actual[:12]} differs from the expected {digest[:12]}")
    files = parse_manifest(data, uri)["files"]
    if is_remote(uri):
        _verify_remote_files(uri, files, deep)
    else:
        _verify_local_files(local_path(uri), files, deep, f"artifact {uri}")
    return ArtifactRef(uri=uri, digest=actual)


def _verify_local_files(root: Path, files: dict[str, dict[str, Any]], deep: bool, label: str) -> None:
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"{label}: file {rel} is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise ArtifactError(f"{label}: file {rel} has {size} bytes, the manifest says {info['size']}")
        if deep and sha256_file(p) != info["sha256"]:
            raise ArtifactError(f"{label}: file {rel} is corrupt (sha256 mismatch)")


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


def list_artifacts(store: str, stage: str) -> list[str]:
    """URIs of the stage's artifacts that have a manifest, newest manifest first."""
    if not is_remote(store):
        found = [(p.stat().st_mtime, str(p.parent)) for p in (local_path(store) / stage).glob(f"*/{MANIFEST}")]
        return [uri for _, uri in sorted(found, reverse=True)]
    fs = filesystem(store)
    with store_errors(store, f"listing the {stage} artifacts"):
        try:
            infos = fs.glob(join_uri(store, stage, "*", MANIFEST), detail=True)
        except FileNotFoundError:
            return []
    found = []
    for path, info in infos.items():
        when = info.get("LastModified") or info.get("mtime") or 0
        when = when.timestamp() if hasattr(when, "timestamp") else float(when)
        found.append((when, join_uri(store, stage, path.rstrip("/").split("/")[-2])))
    return [uri for _, uri in sorted(found, reverse=True)]


def find_artifact(store: str, stage: str, key: str, deep: bool = False) -> ArtifactRef | None:
    """The completed, intact artifact for this key, or None (missing, incomplete or damaged)."""
    uri = join_uri(store, stage, key)
    try:
        return verify_artifact(uri, deep=deep)
    except ArtifactError:
        return None


# ---------------------------------------------------------------------------------------------
# remote stores: stages compute in a local staging dir, `publish` uploads, `materialize` downloads
#
# Deep verification must not download a remote artifact every time: the flows deep-check every cached stage
# before trusting it. S3's ETag is a hash of an object's bytes (their MD5, or for a multipart upload the MD5 of
# the parts' MD5s), so it changes whenever the object is rewritten. Each machine keeps a memo per artifact,
# {file: [ETag, size, sha256]}, of the objects whose bytes it has hashed itself: when it downloaded them, or when
# it uploaded them and the ETag S3 reports equals the one computed from the local file. A deep check lists the
# artifact (one request per 1000 objects), compares sizes, and downloads-and-hashes (streamed) only the files
# whose current ETag it has not seen with the manifest's sha256. Backends without ETags are always hashed.


def remote_listing(fs, uri: str) -> dict[str, dict[str, Any]]:
    """{path relative to uri: object info (size, ETag)} for every object under an artifact."""
    prefix = fs._strip_protocol(uri).rstrip("/") + "/"
    return {name[len(prefix):]: info for name, info in fs.find(uri, detail=True).items() if name.startswith(prefix)}


def _etag(info: dict[str, Any]) -> str | None:
    return info.get("ETag") or info.get("etag")


def _memo_path(uri: str) -> Path:
    return default_cache_root() / ".etags" / f"{hashlib.sha256(uri.encode()).hexdigest()[:24]}.json"


def _read_memo(uri: str) -> dict[str, list]:
    try:
        return json.loads(_memo_path(uri).read_text())
    except (OSError, ValueError):
        return {}


def _remember(uri: str, entries: dict[str, list]) -> None:
    if entries:
        atomic_write_bytes(_memo_path(uri), json.dumps({**_read_memo(uri), **entries}).encode())


def _sha256_remote(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb", cache_type="none") as f:  # streamed: a checkpoint never sits in memory whole
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _s3_etag(path: Path) -> str:
    """The ETag S3 gives the object s3fs uploads from this file: the MD5 of its bytes when s3fs sends it in one
    PUT, else MD5(part MD5s)-<parts> with s3fs's part size. (If s3fs changes its rule, the ETags just stop
    matching and the first deep check downloads the file instead.)"""
    from s3fs.core import calculate_chunksize

    size = path.stat().st_size
    part = calculate_chunksize(size)
    whole, parts = hashlib.md5(usedforsecurity=False), []
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(part), b""):
            whole.update(chunk)
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if size < min(5 * 2**30, 2 * part):
        return f'"{whole.hexdigest()}"'
    return f'"{hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"'


def _verify_remote_files(uri: str, files: dict[str, dict[str, Any]], deep: bool) -> None:
    fs = filesystem(uri)
    with store_errors(uri, "listing the artifact"):
        stored = remote_listing(fs, uri)
    memo, hashed = (_read_memo(uri) if deep else {}), {}
    for rel, info in files.items():
        obj = stored.get(rel)
        if obj is None:
            raise ArtifactError(f"artifact {uri}: file {rel} is missing")
        if obj["size"] != info["size"]:
            raise ArtifactError(f"artifact {uri}: file {rel} has {obj['size']} bytes, the manifest says {info['size']}")
        entry = [_etag(obj), info["size"], info["sha256"]]
        if not deep or (entry[0] and memo.get(rel) == entry):  # these very bytes were hashed here before
            continue
        with store_errors(uri, f"reading {rel}"):
            actual = _sha256_remote(fs, join_uri(uri, rel))
        if actual != info["sha256"]:
            raise ArtifactError(f"artifact {uri}: file {rel} is corrupt (sha256 mismatch)")
        if entry[0]:
            hashed[rel] = entry
    _remember(uri, hashed)


def publish(local_dir: str | Path, uri: str) -> None:
    """Upload a finished local artifact to a remote store: the old manifest off first (a replaced artifact is
    incomplete while its files change), every file (8 at a time), a listing that checks each landed whole, and
    the manifest last. On any failure the store holds no manifest, so readers see an incomplete artifact, and
    running the stage again publishes it anew."""
    if not is_remote(uri):
        return
    root = Path(local_dir)
    manifest_bytes = (root / MANIFEST).read_bytes()  # the very bytes the artifact's digest was taken of
    files = json.loads(manifest_bytes)["files"]
    try:
        fs = filesystem(uri)
        _remove(fs, join_uri(uri, MANIFEST))
        fs.put([str(root / rel) for rel in files], [join_uri(uri, rel) for rel in files], batch_size=8)
        _check_upload(fs, uri, root, files)
        fs.pipe_file(join_uri(uri, MANIFEST), manifest_bytes)
    except Exception as e:  # noqa: BLE001 - whatever failed, the artifact stays incomplete
        raise StoreError(f"publishing {root} to {uri} failed, so the artifact stays incomplete (no {MANIFEST} "
                         f"there); run the stage again to publish it. Cause: {type(e).__name__}: {e}") from e


def _remove(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _check_upload(fs, uri: str, root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Every file landed with its size. Files whose ETag matches the local bytes go into the memo, so the deep
    checks after publishing download nothing."""
    stored, hashed = remote_listing(fs, uri), {}
    for rel, info in files.items():
        size = stored.get(rel, {}).get("size")
        if size != info["size"]:
            raise ArtifactError(f"file {rel} did not land whole ({size} of {info['size']} bytes stored)")
        etag = _etag(stored[rel])
        if etag and uri.startswith(("s3://", "s3a://")) and etag == _s3_etag(root / rel):
            hashed[rel] = [etag, info["size"], info["sha256"]]
    _remember(uri, hashed)


def _staged_copy(uri: str) -> Path:
    """Where this machine computed the artifact at `uri` (<store>/<stage>/<key>), if it did."""
    store, stage, key = uri.rstrip("/").rsplit("/", 2)
    return staging_dir(store, stage, key)


def _is_copy_of(local: Path, manifest_bytes: bytes, files: dict[str, dict[str, Any]]) -> bool:
    """`local` holds exactly this manifest and files matching it (sha256: it is about to be loaded)."""
    try:
        if (local / MANIFEST).read_bytes() != manifest_bytes:
            return False
        _verify_local_files(local, files, True, str(local))
        return True
    except (OSError, ArtifactError):
        return False


def _download(uri: str, manifest_bytes: bytes, files: dict[str, dict[str, Any]], dest: Path) -> None:
    """Download every file into a temp dir, check each sha256, then move the whole into place."""
    unsafe = [rel for rel in files if rel.startswith("/") or ".." in rel.split("/")]
    if unsafe:
        raise ArtifactError(f"artifact {uri}: manifest names files outside the artifact: {unsafe}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".dl-"))
    try:
        fs = filesystem(uri)
        with store_errors(uri, "downloading the artifact"):
            try:
                fs.get([join_uri(uri, rel) for rel in files], [str(tmp / rel) for rel in files], batch_size=8)
            except FileNotFoundError as e:
                raise ArtifactError(f"artifact {uri}: a file its manifest lists is missing ({e})") from e
        _verify_local_files(tmp, files, True, f"artifact {uri} (downloaded)")
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same download first
            if not _is_copy_of(dest, manifest_bytes, files):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialize(ref: ArtifactRef, cache_root: str | Path | None = None) -> Path:
    """A local directory holding the artifact. For a remote store the store's manifest must still have the
    ref's digest; then the stage's own staging dir (when this machine computed the artifact) or the download
    cache is used if its files match the manifest (sha256), else the artifact is downloaded and checked."""
    if not is_remote(ref.uri):
        return local_path(ref.uri)
    manifest_bytes = read_manifest_bytes(ref.uri)
    if manifest_bytes is None:
        raise ArtifactError(f"artifact {ref.uri} is incomplete: it has no {MANIFEST}")
    if hashlib.sha256(manifest_bytes).hexdigest() != ref.digest:
        raise ArtifactError(f"artifact {ref.uri} changed: its manifest no longer matches digest {ref.digest[:12]}")
    files = parse_manifest(manifest_bytes, ref.uri)["files"]
    dest = Path(cache_root or default_cache_root()) / ref.digest[:20]
    for local in (_staged_copy(ref.uri), dest):
        if _is_copy_of(local, manifest_bytes, files):
            return local
    _download(ref.uri, manifest_bytes, files, dest)
    return dest
