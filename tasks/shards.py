"""What a stage works on: input items, stable shards and their cache keys."""

from __future__ import annotations

import ast
import hashlib
import json
import posixpath
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bfr_models import manifest, storage


ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("bfr_models", "tasks")  # the code a stage runs; flows only plan and orchestrate


def _code_version() -> str:
    """Hash of all science and task code, for keys not tied to one stage's modules (training runs)."""
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


CODE_VERSION = _code_version()


def _module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(name: str, path: Path) -> set[str]:
    """Every module name an import statement of the file may refer to, lazy imports inside functions too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join([*parts[: len(parts) - node.level + 1], node.module or ""] if node.level else [node.module])
            base = base.strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def module_files(module: str, root: Path = ROOT) -> list[Path]:
    """The files of ``module`` and of every bfr_models/tasks module it imports, transitively (read statically,
    so the answer does not depend on what happens to be imported), with their parent packages' ``__init__``."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in CODE_PACKAGES:
            continue
        path = _module_file(root, name)
        if path is None:  # a name imported from a module, not a module
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imported_names(name, path))
    return sorted(set(seen.values()))


@lru_cache(maxsize=None)
def code_version(module: str, root: Path = ROOT) -> str:
    """Hash of the code a stage runs: its task module and what it imports, so editing the report or
    another stage keeps this stage's cache."""
    h = hashlib.sha256()
    for path in module_files(module, root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def stable_hash(obj, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class InputItem:
    uri: str
    version: str  # changes when the content changes (sha256, ETag or size-mtime)
    parent_id: str | None = None  # image_id of the manifest row it came from
    split: str | None = None
    row: str | None = None  # the whole manifest row as JSON, for stages that annotate rows (score)
    reference: str | None = None  # URI of the image it is compared with (full-reference metrics)
    name: str | None = None  # a folder's file: its name relative to the folder (its id derives from it)
    duplicate_of: str | None = None  # a folder's file byte-identical to an earlier one: that one's id
    source_name: str | None = None  # the original file's name without extension, carried down the lineage


class ShardSpec:
    """One shard task's work: its stage, its key (cache key: stage + config + inputs + code version) and its
    items. A plain class, not a dataclass: Prefect walks a dataclass task parameter field by field and item
    by item looking for futures, when the task is submitted and again where it runs (~30 ms for a 1024-image
    shard); it leaves other objects alone."""

    __slots__ = ("stage", "key", "items")

    def __init__(self, stage: str, key: str, items: tuple[InputItem, ...]):
        self.stage, self.key, self.items = stage, key, items

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardSpec) and (self.stage, self.key, self.items) == (other.stage, other.key,
                                                                                         other.items)

    def __hash__(self) -> int:
        return hash((self.stage, self.key, self.items))

    def __repr__(self) -> str:
        return f"ShardSpec(stage={self.stage!r}, key={self.key!r}, items=<{len(self.items)} items>)"


def list_inputs(uri: str, exclude: tuple[str, ...] | list[str] = ()) -> tuple[list[InputItem], int]:
    """Items of a manifest (its ok rows) or of a folder (every file: what is not an image becomes an
    error row); also how many were skipped (a manifest's error rows; a folder's dotfiles and ``exclude``
    matches)."""
    if manifest.is_manifest(uri):
        if exclude:
            raise ValueError(f"--exclude applies to folder inputs; {uri} is a manifest")
        df = manifest.read_manifest(uri)
        ok = df[df["status"] == "ok"]
        items = [
            InputItem(uri=r.uri, version=r.sha256, parent_id=r.image_id, split=r.split,
                      source_name=getattr(r, "source_name", None))  # absent in manifests written before it
            for r in ok.itertuples(index=False)
        ]
        return sorted(items, key=lambda i: (i.uri, i.parent_id or "")), len(df) - len(ok)
    files, skipped = storage.list_files(uri, exclude)
    first = _duplicates(files)
    items = []
    for f in files:
        dup = first.get(f.uri)  # in the version too, so a shard's cache key sees it
        items.append(InputItem(uri=f.uri, version=f.version if dup is None else f"{f.version} duplicate_of:{dup}",
                               name=f.name, duplicate_of=dup, source_name=source_name(f.name)))
    return items, skipped


def source_name(name: str) -> str:
    """A folder file's name as users know it: its path relative to the folder, without the extension."""
    return posixpath.splitext(name)[0]


def _duplicates(files: list[storage.ListedFile], batch: int = 64) -> dict[str, str]:
    """URI -> image_id of the first (by URI) byte-identical file, for every later copy.

    Only files that share their size with another are read (and hashed) here, a batch at a time.
    """
    from tasks.rows import digest_id

    by_size: dict[int, list[storage.ListedFile]] = {}
    for f in files:
        by_size.setdefault(f.size, []).append(f)
    candidates = [f for group in by_size.values() if len(group) > 1 for f in group]
    digests = {}
    for start in range(0, len(candidates), batch):
        chunk = read_many([f.uri for f in candidates[start : start + batch]])
        digests.update({u: storage.sha256_hex(d) for u, d in chunk.items() if isinstance(d, bytes)})
    first: dict[str, str] = {}  # sha256 -> id of its first file
    out = {}
    for f in sorted(candidates, key=lambda f: f.uri):
        if f.uri in digests:
            if digests[f.uri] in first:
                out[f.uri] = first[digests[f.uri]]
            else:
                first[digests[f.uri]] = digest_id(digests[f.uri], f.name)
    return out


def shard_boundary(uri: str, length: int, shard_size: int) -> bool:
    """Whether a shard of ``length`` items ends at ``uri``: decided by the URI's hash and the length only.

    No cut before half the size; then a cut where the hash is 0 mod ``shard_size`` until the shard reaches
    the size, and 0 mod a quarter of it after (so shards rarely grow long); always a cut at twice the size.
    Adding images changes the shards they land in (and rarely the next one, when a cut moves past the minimum).
    """
    if length >= 2 * shard_size:
        return True
    if length < max(1, shard_size // 2):
        return False
    modulus = shard_size if length < shard_size else max(1, shard_size // 4)
    return int(hashlib.sha256(uri.encode()).hexdigest()[:8], 16) % modulus == 0


def make_shards(stage: str, config: dict, items: list[InputItem], shard_size: int) -> list[ShardSpec]:
    """Split sorted items at content-defined boundaries (see :func:`shard_boundary`); shards keep their keys,
    and so their cache, when images are added elsewhere. ``config`` includes the stage's code version."""
    config_hash = stable_hash(config)
    shards, current = [], []
    for item in items:
        current.append(item)
        if shard_boundary(item.uri, len(current), shard_size):
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    return [
        ShardSpec(
            stage=stage,
            key=stable_hash([stage, config_hash, [(i.uri, i.version, i.parent_id, i.reference) for i in s]]),
            items=tuple(s),
        )
        for s in shards
    ]


def derived_seed(seed: int, *parts: str) -> int:
    """A per-image seed that depends on the run seed and the image, not on batch or order."""
    return int(hashlib.sha256(":".join([str(seed), *parts]).encode()).hexdigest()[:15], 16)


def read_many(uris: list[str]) -> dict[str, bytes | Exception]:
    """Fetch many files concurrently (one batched call per filesystem); errors are returned."""
    out: dict[str, bytes | Exception] = {}
    by_fs: dict[str, list[tuple[str, str]]] = {}
    fss = {}
    for uri in uris:
        fs, path = storage.filesystem(uri)
        key = type(fs).__name__
        fss[key] = fs
        by_fs.setdefault(key, []).append((uri, path))
    for key, pairs in by_fs.items():
        got = fss[key].cat([p for _, p in pairs], on_error="return")
        for uri, path in pairs:
            value = got.get(path, FileNotFoundError(path)) if isinstance(got, dict) else got
            out[uri] = value
    return out
