"""Step `download`: put a model's files into results/models/<key>, from the hub cache, a local dir or built in.

Remote sources look in the cache first (no network) and only go online when the model is absent and
`download.offline` is false; the output links to the resolved snapshot instead of copying gigabytes.
Every source writes `source.json` (source, revision, resolved path, sha256 of every file).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from workflow import cli
from workflow.io import atomic_dir, write_json_atomic
from workflow.params import ModelEntry, Params

log = logging.getLogger("workflow.download")

ENDPOINTS = {  # what the reachability probe asks; the hub libraries read the same variables
    "modelscope": ("MODELSCOPE_ENDPOINT", "https://modelscope.cn"),
    "hf": ("HF_ENDPOINT", "https://huggingface.co"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file read in 16 MB chunks (weights can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (following links), keyed by relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def check_model_dir(path: Path, what: str) -> None:
    """Raise StepError (one line, naming the path) unless `path` looks like a loadable model."""
    if not path.is_dir():
        raise cli.StepError(f"{what}: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise cli.StepError(f"{what}: {path} has no config.json; point the source at a transformers model dir")
    if not any(path.glob("*.safetensors")):
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f"found only {', '.join(other[:3])}; re-save it with save_pretrained()" if other else "no weights"
        raise cli.StepError(f"{what}: {path} has no *.safetensors weights ({hint})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise cli.StepError(f"{what}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def link_tree(src: Path, dst: Path) -> None:
    """Mirror `src` into `dst` with absolute symlinks to its files.

    Skipped: dot-files (the hubs' metadata) and a source.json of an earlier download (we write our own).
    """
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or rel.as_posix() == "source.json":
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).symlink_to(p.absolute())


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE for the block: huggingface_hub reads the variable once at import, so set both."""
    from huggingface_hub import constants

    saved_env, saved_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_const
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def hub_snapshot(kind: str, repo_id: str, revision: str | None, cache_dir: str, local_only: bool,
                 timeout_s: float) -> str:
    """One call of the hub library's snapshot_download; tokens come from the environment only."""
    if kind == "modelscope":
        from modelscope import snapshot_download

        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only)
    from huggingface_hub import snapshot_download

    ctx = hf_offline() if local_only else contextlib.nullcontext()
    with ctx:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
                                 etag_timeout=timeout_s)


def reachable(kind: str, timeout_s: float) -> bool:
    """Whether the hub's endpoint answers at all within `timeout_s` (honours proxy variables)."""
    var, default = ENDPOINTS[kind]
    try:
        urllib.request.urlopen(os.environ.get(var) or default, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # an HTTP error status still means the hub is there
    except (OSError, ValueError):
        return False
    return True


def fetch_remote(params: Params, key: str, entry: ModelEntry) -> Path:
    """The snapshot dir of a modelscope:/hf: source: from the cache, else (if allowed) from the hub."""
    kind, repo_id = entry.source.split(":", 1)
    dl = params.download
    where = f"models.{key} ({entry.source} @ {entry.revision or 'default branch'})"
    try:
        return Path(hub_snapshot(kind, repo_id, entry.revision, dl.cache_dir, True, dl.timeout_s))
    except Exception as exc:  # the libraries raise assorted types for "not in the cache"
        log.info("%s not in the cache %s (%s)", where, dl.cache_dir, type(exc).__name__)
    if dl.offline:
        raise cli.StepError(f"{where}: not in the cache {dl.cache_dir} and download.offline is true; "
                            "fill the cache (or point download.cache_dir at a filled one) "
                            "or set download.offline: false")
    if not reachable(kind, dl.timeout_s):
        raise cli.StepError(f"{where}: not in the cache {dl.cache_dir} and the hub is unreachable "
                            f"(no answer within {dl.timeout_s:g} s); check the network, or fill the cache and "
                            "set download.offline: true")
    log.info("%s: downloading into %s", where, dl.cache_dir)
    try:
        return Path(hub_snapshot(kind, repo_id, entry.revision, dl.cache_dir, False, dl.timeout_s))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise cli.StepError(f"{where}: download failed ({type(exc).__name__}: {first}); check the id, revision, "
                            "network and token (HF_TOKEN / MODELSCOPE_API_TOKEN)") from exc


def download_model(params: Params, model_key: str, out: str | Path) -> dict:
    """Materialise `models.<model_key>` in `out`; return what source.json holds."""
    entry = params.models[model_key]
    source = entry.source
    with atomic_dir(out) as tmp:
        if source.startswith("builtin:"):
            from workflow.builtin import build_builtin

            name = source.split(":", 1)[1]
            build_builtin(name, params.builtin[name], params.seed, tmp)
            resolved = Path(out).absolute()  # built in place: the output is the model
        else:
            if source.startswith(("modelscope:", "hf:")):
                resolved = fetch_remote(params, model_key, entry)
            else:
                resolved = Path(source).expanduser()
            check_model_dir(resolved, f"models.{model_key}.source")
            link_tree(resolved, tmp)
            resolved = resolved.absolute()
        info = {
            "model": model_key,
            "source": source,
            "revision": entry.revision,
            "resolved_path": str(resolved),
            "trust_remote_code": entry.trust_remote_code,
            "sha256": file_hashes(tmp),
        }
        write_json_atomic(tmp / "source.json", info)
    log.info("models.%s: %d files from %s in %s", model_key, len(info["sha256"]), source, out)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("download", __doc__)
    p.add_argument("--out", required=True, help="output dir, e.g. results/models/<key>")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    if params.download.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub, for the whole step
    download_model(params, args.model, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
