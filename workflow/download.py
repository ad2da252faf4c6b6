"""Step `download`: put a model's files into results/models/<key>, from the hub cache, a local dir or built in.

Remote sources look in the cache first (no network) and only go online when the model is absent and
`download.offline` is false; the output links to the resolved snapshot instead of copying gigabytes.
Every source writes `source.json` (source, revision, resolved path, sha256 of every file). Remote sources also
keep those hashes in results/sources/<key>.json (committed, never deleted by the orchestrators): a later
download of the same source and revision whose files differ fails instead of silently using the new files.

A family whose own code does not run under transformers 5 (config.json `model_type` chatglm or qwen) is
converted into a native architecture instead of linked (`workflow.convert`); source.json then records the
conversion and the source files' hashes.

Nothing from the model is imported here: any other model that ships code (config.json `auto_map`) is refused
unless its entry sets `trust_remote_code`, and pickle weights (*.bin, ...) are neither fetched nor linked unless it
sets `allow_pickle`. Hub tokens come from the environment (HF_TOKEN, MODELSCOPE_API_TOKEN) and are never logged.
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

from workflow import cli, convert
from workflow.io import atomic_dir, read_json, write_json_atomic
from workflow.params import ModelEntry, Params
from workflow.remote import remote_code

log = logging.getLogger("workflow.download")

ENDPOINTS = {  # what the reachability probe asks; the hub libraries read the same variables
    "modelscope": ("MODELSCOPE_ENDPOINT", "https://modelscope.cn"),
    "hf": ("HF_ENDPOINT", "https://huggingface.co"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "qwen.tiktoken", "tokenizer_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load formats: loading may run code
SOURCES_ROOT = Path("results/sources")  # recorded hashes of remote models; not an output, committed to git


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


def check_model_dir(path: Path, what: str, entry: ModelEntry) -> None:
    """Raise StepError (one line, naming the path) unless `path` looks like a model `entry` allows loading.

    Reads only JSON and file names: nothing of the model is imported or unpickled.
    """
    if not path.is_dir():
        raise cli.StepError(f"{what}: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise cli.StepError(f"{what}: {path} has no config.json; point the source at a transformers model dir")
    code = remote_code(path)
    if code and not entry.trust_remote_code and not convert.needs_conversion(path):  # converted: code never runs
        raise cli.StepError(f"{what}: {path} ships its own Python code ({', '.join(code[:3])}); nothing was run. "
                            f"Set trust_remote_code: true on the model only if you trust that code")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not any(path.glob("*.safetensors")) and not (entry.allow_pickle and pickles):
        if pickles:
            hint = (f"found only {', '.join(pickles[:3])}, pickle weights; re-save them with save_pretrained() "
                    "or set allow_pickle: true on the model if you trust them")
        else:
            hint = "no weights"
        raise cli.StepError(f"{what}: {path} has no *.safetensors weights ({hint})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise cli.StepError(f"{what}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def link_tree(src: Path, dst: Path, allow_pickle: bool = False) -> None:
    """Mirror `src` into `dst` with absolute symlinks to its files.

    Skipped: dot-files (the hubs' metadata), a source.json of an earlier download (we write our own) and,
    unless `allow_pickle`, pickle files, so no later step can load them.
    """
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or rel.as_posix() == "source.json":
            continue
        if p.suffix in PICKLE_SUFFIXES and not allow_pickle:
            log.info("not linking %s: pickle file and allow_pickle is false", rel)
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
                 timeout_s: float, allow_pickle: bool = False) -> str:
    """One call of the hub library's snapshot_download; tokens come from the environment only.

    Pickle weights are not fetched unless `allow_pickle` (repos often carry both formats: gigabytes saved).
    """
    ignore = None if allow_pickle else [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    if kind == "modelscope":
        from modelscope import snapshot_download

        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
                                 ignore_patterns=ignore)
    from huggingface_hub import snapshot_download

    ctx = hf_offline() if local_only else contextlib.nullcontext()
    with ctx:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
                                 etag_timeout=timeout_s, ignore_patterns=ignore)


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
        return Path(hub_snapshot(kind, repo_id, entry.revision, dl.cache_dir, True, dl.timeout_s,
                                 entry.allow_pickle))
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
        return Path(hub_snapshot(kind, repo_id, entry.revision, dl.cache_dir, False, dl.timeout_s,
                                 entry.allow_pickle))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise cli.StepError(f"{where}: download failed ({type(exc).__name__}: {first}); check the id, revision, "
                            "network and token (HF_TOKEN / MODELSCOPE_API_TOKEN)") from exc


def check_recorded_hashes(model_key: str, info: dict) -> None:
    """Fail if the same source and revision now give other files than when first recorded."""
    record = SOURCES_ROOT / f"{model_key}.json"
    if not record.is_file():
        return
    before = read_json(record)
    if (before.get("source"), before.get("revision")) != (info["source"], info["revision"]):
        log.info("models.%s: source or revision changed since %s; recording the new hashes", model_key, record)
        return
    old, new = before.get("sha256", {}), info.get("source_sha256", info["sha256"])
    changed = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
    if changed:
        raise cli.StepError(
            f"models.{model_key}: {info['source']} @ {info['revision'] or 'default branch'} changed upstream since "
            f"{record} was recorded ({len(changed)} file(s) differ: {', '.join(changed[:3])}); check the change, "
            f"then pin a new revision or delete {record} to accept it"
        )


def project_relative(path: Path) -> str:
    """`path` as source.json records it: relative to the project's root when inside it, so that the record,
    and with it the model dir's hash in dvc.lock, is the same in every clone; else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def download_model(params: Params, model_key: str, out: str | Path) -> dict:
    """Materialise `models.<model_key>` in `out`; return what source.json holds."""
    entry = params.models[model_key]
    source = entry.source
    converted = None
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
            check_model_dir(resolved, f"models.{model_key}.source", entry)
            resolved = resolved.absolute()
            if convert.needs_conversion(resolved):
                converted = convert.convert(resolved, tmp)
                check_model_dir(tmp, f"models.{model_key} (converted)", entry)
            else:
                link_tree(resolved, tmp, entry.allow_pickle)
        info = {
            "model": model_key,
            "source": source,
            "revision": entry.revision,
            "resolved_path": project_relative(resolved),
            "trust_remote_code": entry.trust_remote_code,
            "allow_pickle": entry.allow_pickle,
            "sha256": file_hashes(tmp),
        }
        if converted:
            info["converted"] = converted
            info["source_sha256"] = file_hashes(resolved)  # what upstream delivered; `sha256` is our output
        remote = source.startswith(("modelscope:", "hf:"))
        if remote:
            check_recorded_hashes(model_key, info)
        write_json_atomic(tmp / "source.json", info)
    if remote:
        write_json_atomic(SOURCES_ROOT / f"{model_key}.json",
                          {**{k: info[k] for k in ("model", "source", "revision")},
                           "sha256": info.get("source_sha256", info["sha256"])})
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
