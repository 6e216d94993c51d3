"""The Hugging Face Hub: repositories named as timm names them (``hf-hub:owner/name``),
weights downloaded from one, and a folder uploaded to one. Both directions live here, in the
layout timm reads (``config.json`` beside ``model.safetensors``; the folder itself is written
by :mod:`cait.models.timm_interop`). ``huggingface_hub`` is imported only when the network is
used.
"""

from __future__ import annotations

import os
import re

from cait.files import error_line

__all__ = [
    "HUB_CONFIG",
    "HUB_PREFIX",
    "HUB_WEIGHTS",
    "HubUploadError",
    "check_repo_id",
    "download_hub_weights",
    "is_hub_id",
    "looks_like_repo_id",
    "push_folder_to_hub",
]

# How timm (and cait) write a Hugging Face Hub repository: hf-hub:owner/name
HUB_PREFIX = "hf-hub:"
# owner/name as the Hub spells them: word characters, "." and "-", not starting with either
# (so no "..")
_REPO_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")
# The files of a Hub repo in timm's layout (timm.models.load_model_config_from_hf)
HUB_CONFIG = "config.json"
HUB_WEIGHTS = "model.safetensors"


class HubUploadError(ValueError):
    """The Hub refused or could not take an upload; the folder is kept."""


def is_hub_id(text: str) -> bool:
    """Whether ``text`` names a Hugging Face Hub repository: ``hf-hub:owner/name``, as timm
    writes it. A bare ``owner/name`` is a local path (``runs/small`` must never be looked up
    on the network)."""
    return text.startswith(HUB_PREFIX) and bool(_REPO_ID.match(text.removeprefix(HUB_PREFIX)))


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` reads like ``owner/name`` (a hint that a Hub repo was meant)."""
    return bool(_REPO_ID.match(text))


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` (``owner/name``, as an upload names it) checked by huggingface_hub's own
    rules; a ``ValueError`` in one line otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {err}") from err
    return repo_id


def download_hub_weights(hub_id: str) -> str:
    """The local path of ``model.safetensors`` of the Hub repo ``hf-hub:owner/name``
    (downloaded, or from huggingface_hub's cache); ``FileNotFoundError`` in one line when
    the Hub cannot provide it."""
    from huggingface_hub import hf_hub_download

    repo_id = hub_id.removeprefix(HUB_PREFIX)
    try:
        return hf_hub_download(repo_id, HUB_WEIGHTS)
    except Exception as err:  # network, missing repo, offline mode: all end here
        raise FileNotFoundError(
            f"checkpoint not found: the Hugging Face Hub could not provide "
            f"{repo_id}/{HUB_WEIGHTS} ({error_line(err)})"
        ) from err


def push_folder_to_hub(folder: str | os.PathLike[str], repo_id: str) -> str:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created when missing); returns
    the commit URL. Needs a token (``hf auth login``) and the network."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model")
    except Exception as err:  # network, authentication, permissions: all end the push
        raise HubUploadError(
            f"could not upload {folder} to the Hub repo {repo_id} ({error_line(err)}); the "
            f"folder is written: retry with `hf upload {repo_id} {folder}`"
        ) from err
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
