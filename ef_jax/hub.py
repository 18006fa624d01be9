"""Hugging Face Hub ids as model paths: `org/name[@revision]` → a snapshot directory in the standard HF cache.

model argument → local path? (exists: used as it is) → hub id? → offline (HF_HUB_OFFLINE): the cached snapshot
             → online: model_info (gated / missing / .bin-only refused here) → snapshot_download(WANTED files)

Only the files ef_jax reads are downloaded (config, generation config, safetensors and their index, tokenizer
files), into the cache huggingface_hub uses everywhere else (HF_HOME / HF_HUB_CACHE), with HF_TOKEN for gated
repos. Every failure is one HubError line naming the fix, raised before any weight is read.
"""
from __future__ import annotations

import fnmatch
import os
import re

# What ef_jax reads from a checkpoint (ef_jax.checkpoint, ef_jax.model.load_tokenizer, generation_config).
WANTED = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
          "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
          "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# org/name, optionally @revision: the Hub's repo-name characters (letters, digits, - _ .), one slash.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_TRUE = ("1", "on", "yes", "true")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message says what to do (ef_jax.cli: exit 2)."""


def is_hub_id(path: str) -> bool:
    """`org/name[@rev]` that is not an existing local path (a local directory always wins)."""
    return not os.path.exists(path) and _HUB_ID.match(path) is not None


def resolve(path: str | os.PathLike | None) -> str | None:
    """A local path unchanged (None too: the caller's default model); a Hub id → its local snapshot directory.

    Raises:
      HubError: the repo is gated or private without HF_TOKEN, does not exist, holds only .bin weights, or
        cannot be fetched (no network) and is not in the cache.
    """
    if path is None:
        return None
    path = os.fspath(path)
    if not is_hub_id(path):
        return path
    m = _HUB_ID.match(path)
    repo, rev = m["repo"], m["rev"]
    return _from_cache(repo, rev) if offline() else _download(repo, rev)


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE")
    return env.strip().lower() in _TRUE if env is not None else bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    """The HF hub cache: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default; read now."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _name(repo: str, rev: str | None) -> str:
    return repo + (f"@{rev}" if rev else "")


def _from_cache(repo: str, rev: str | None, why: str = "HF_HUB_OFFLINE is set") -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        snap = snapshot_download(repo, revision=rev, cache_dir=cache_dir(), allow_patterns=list(WANTED),
                                 local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise HubError(f"{_name(repo, rev)} is not in the Hugging Face cache {cache_dir()} and {why}: download it "
                       "once with network access (unset HF_HUB_OFFLINE), or point HF_HOME at a cache that holds "
                       "it") from None
    check_files(repo, rev, [os.path.relpath(os.path.join(d, f), snap) for d, _, fs in os.walk(snap) for f in fs])
    return snap


def check_files(repo: str, rev: str | None, files: list[str]) -> None:
    """Refuses a repo ef_jax cannot read: no config.json, or weights only as PyTorch .bin files."""
    name = _name(repo, rev)
    if "config.json" not in files:
        raise HubError(f"{name} has no config.json: give a Hugging Face model repo (a transformers checkpoint)")
    if not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith((".bin", ".pt", ".pth")) for f in files):
            raise HubError(f"{name} has only PyTorch .bin weights; ef_jax reads safetensors: pick a repo (or "
                           "revision) with .safetensors files, or convert it with transformers' save_pretrained "
                           "(safe_serialization=True)")
        raise HubError(f"{name} has no .safetensors weights: give a repo with model*.safetensors")


def _network_error(e: BaseException) -> bool:
    mod = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or mod in ("httpx", "httpx2", "requests", "urllib3") \
        or "OfflineModeIsEnabled" in type(e).__name__


def explain(repo: str, rev: str | None, e: BaseException) -> HubError | None:
    """The one line for a Hub failure of model_info/snapshot_download; None when it is not one we know."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    name = _name(repo, rev)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or status in (401, 403):
        return HubError(f"{name} is gated or private and this request has no access: accept its terms on "
                        f"https://huggingface.co/{repo} and set HF_TOKEN to a token that may read it "
                        "(or run `hf auth login`)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{name}: the repo has no revision {rev!r}: give a branch, tag or commit after @")
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return HubError(f"{name} is not a model on the Hugging Face Hub (a private repo needs HF_TOKEN): check "
                        "the id, or give a local checkpoint directory")
    if _network_error(e):
        return HubError(f"{name}: cannot reach the Hugging Face Hub ({type(e).__name__}) and the model is not in "
                        f"the cache {cache_dir()}: connect, or set HF_HUB_OFFLINE=1 with a cache that holds it")
    if isinstance(e, HfHubHTTPError):
        return HubError(f"{name}: the Hub answered HTTP {status} ({e}); retry, or give a local directory")
    return None


def _download(repo: str, rev: str | None) -> str:
    from huggingface_hub import HfApi, snapshot_download
    try:
        info = HfApi().model_info(repo, revision=rev)
    except Exception as e:  # noqa: BLE001 — sorted by explain(); an unknown one propagates as it is
        err = explain(repo, rev, e)
        if err is None:
            raise
        if _network_error(e):  # no network: a cached copy still serves, as transformers does
            try:
                return _from_cache(repo, rev, why="the Hub cannot be reached")
            except HubError:
                raise err from None
        raise err from None
    check_files(repo, rev, [s.rfilename for s in info.siblings or ()])
    wanted = [s.rfilename for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in WANTED)]
    try:
        return snapshot_download(repo, revision=info.sha or rev, cache_dir=cache_dir(), allow_patterns=wanted)
    except Exception as e:  # noqa: BLE001
        err = explain(repo, rev, e)
        if err is None:
            raise
        raise err from None
