"""Where a checkpoint lives: a local directory, or a hub id resolved through huggingface_hub's cache."""
from __future__ import annotations

import os
from pathlib import Path

from idefics.errors import IdeficsError

DEMO_DIR = Path(__file__).parent / "demo" / "checkpoint"
_FILES = ["*.json", "tokenizer.model"]


def resolve(model: str | os.PathLike | None) -> Path:
    """A checkpoint directory for `model`: None (or $IDEFICS_MODEL) -> the embedded demo model; an existing path;
    else a hub id such as "HuggingFaceM4/idefics-9b" (HF_HOME and HF_HUB_OFFLINE are honoured)."""
    if model is None:
        model = os.environ.get("IDEFICS_MODEL") or DEMO_DIR
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise IdeficsError(f"{path}: expected a checkpoint directory, found a file")
        return path
    name = str(model)
    if path.is_absolute() or name.startswith(".") or name.count("/") != 1:
        raise IdeficsError(f"{path}: no such checkpoint directory (nor a hub id like 'HuggingFaceM4/idefics-9b')")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # safetensors first: the released repos carry .bin copies too, which would double the download.
        path = Path(snapshot_download(repo_id, allow_patterns=_FILES + ["*.safetensors", "*.safetensors.index.json"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=_FILES + ["*.bin", "*.bin.index.json"]))
    except LocalEntryNotFoundError:
        raise IdeficsError(
            f"{repo_id}: not in the local hub cache and the hub cannot be reached (offline?); "
            "download it once with network access or pass a local directory"
        ) from None
    except RepositoryNotFoundError:
        raise IdeficsError(f"{repo_id}: no such model repository on the hub (or it needs a token)") from None
    except Exception as e:  # network and HTTP errors of many kinds
        raise IdeficsError(f"{repo_id}: could not fetch from the hub ({type(e).__name__}: {e})".splitlines()[0]) from None
    return path
