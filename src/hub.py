"""Files on the Hugging Face hub: `hf-hub:OWNER/REPO/FILE` references (`--model-path`, `--clip-weights`)
and open_clip's pretrained weights (`--clip-pretrained`), found the way open_clip finds its own.

The local hub cache (`HF_HUB_CACHE`, by default `~/.cache/huggingface/hub`) is looked at first; a
file is downloaded only when the hub can be reached, once. Offline (`HF_HUB_OFFLINE=1`, or no
network) a file that is not cached stops the script at once with one message naming what to
download and where it goes, instead of retrying a hub that is not there.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Sequence

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

from errors import UserError

HF_HUB_PREFIX = "hf-hub:"
HF_HUB_HOST = ("huggingface.co", 443)


class HubError(UserError):
    """A hub file that is not cached and cannot be downloaded, or a malformed hub reference."""


def is_hub_reference(value) -> bool:
    return isinstance(value, str) and value.startswith(HF_HUB_PREFIX)


def parse_hub_reference(ref: str, flag: str) -> tuple[str, str]:
    """`hf-hub:OWNER/REPO/FILE` -> (repo id `OWNER/REPO`, file path inside the repository)."""
    parts = ref[len(HF_HUB_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise HubError(f"{flag} {ref}: expected hf-hub:OWNER/REPO/FILE, a file inside a model repository of the "
                       "Hugging Face hub (e.g. hf-hub:timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors)")
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, as huggingface_hub reads them."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 1.5) -> bool:
    """False offline or when the hub's host does not answer within `timeout` seconds."""
    if hub_offline():
        return False
    try:
        with socket.create_connection(HF_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def fail_if_offline(message: Callable[[], str], error: type[UserError] = HubError) -> None:
    """The check every download goes through first: when the hub cannot be reached (offline, or no answer
    within 1.5 s) the script stops at once with `error(message())`, instead of a download retrying a hub
    that is not there."""
    if not hub_reachable():
        raise error(message())


def hub_cache_dir() -> str:
    """The hub cache folder huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    return constants.HF_HUB_CACHE


def cached_hub_file(repo_id: str, filenames: Sequence[str]) -> Path | None:
    """The first of `filenames` that the hub cache holds for `repo_id` (its `main` revision), else None."""
    for name in filenames:
        got = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache_dir())
        if isinstance(got, str):
            return Path(got)
    return None


def not_cached_message(what: str, repo_id: str, filename: str | None, alternative: str) -> str:
    """What to do when `filename` of `repo_id` (None: the whole repository) is neither cached nor downloadable."""
    cache = hub_cache_dir()
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    fetch = f"hf download {repo_id}" + (f" {filename}" if filename else "")
    return (f"{what}: not in the Hugging Face cache ({cache}), and the hub cannot be reached (offline: "
            f"HF_HUB_OFFLINE=1, or no network). On a machine with internet run `{fetch}`, "
            f"then copy the folder {folder} from its hub cache (~/.cache/huggingface/hub) into {cache} here, or point "
            f"HF_HUB_CACHE at a copy; {alternative}")


def download_hub_file(repo_id: str, filename: str, what: str) -> Path:
    """One download attempt through huggingface_hub (into its cache)."""
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir()))
    except Exception as e:  # noqa: BLE001 - network, authorisation or a missing file all mean the same here
        raise HubError(f"{what}: the download of {filename} from the Hugging Face repository {repo_id} failed "
                       f"({type(e).__name__}: {str(e)[:300]})") from e


def hub_file(ref: str, flag: str) -> Path:
    """The local file an `hf-hub:OWNER/REPO/FILE` reference names: cached, else downloaded once."""
    repo_id, filename = parse_hub_reference(ref, flag)
    cached = cached_hub_file(repo_id, [filename])
    if cached is not None:
        return cached
    fail_if_offline(lambda: not_cached_message(f"{flag} {ref}", repo_id, filename,
                                               f"or download the file by hand and pass its path to {flag}"))
    return download_hub_file(repo_id, filename, f"{flag} {ref}")


def local_file(value, flag: str):
    """`value` itself, or the local file of an `hf-hub:` reference (None stays None)."""
    return hub_file(value, flag) if is_hub_reference(value) else value
