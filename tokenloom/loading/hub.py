"""Resolve a Hugging Face Hub id (`org/name`) to a local snapshot directory with huggingface_hub.

The library's own defaults decide where files are cached (HF_HOME, HF_HUB_CACHE) and which endpoint
is used (HF_ENDPOINT). Offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) is read at call time, so
setting it after huggingface_hub was imported still works. Every failure becomes HubUnavailableError.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tokenloom.errors import HubUnavailableError
from tokenloom.loading.pull import list_pullable

# Only what tokenloom reads: config, generation config, tokenizer files, chat templates, safetensors.
HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
)

_PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub loaded."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _proxy_configured() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _endpoint_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """A quick TCP connect to the hub endpoint, so an unreachable network fails in seconds.

    huggingface_hub's HTTP client has no timeout of its own; a black-holed network would hang it.
    Behind a proxy the direct connection says nothing, so the probe is skipped there.
    """
    if _proxy_configured():
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname
    if not host:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(repo_id: str, revision: str | None, reason: str) -> HubUnavailableError:
    at = f" at revision {revision!r}" if revision else ""
    names = ", ".join(list_pullable())
    return HubUnavailableError(
        f"could not get hub model {repo_id!r}{at}: {reason}",
        hint=f"pass a local path (a .gguf file or an HF checkpoint directory), or run `tokenloom pull NAME` "
        f"with NAME one of: {names}",
    )


def resolve_hub_id(repo_id: str, *, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """Download (or find in the local hub cache) the files tokenloom needs; return the snapshot directory.

    With `gguf_file`, only that file is fetched (GGUF repositories hold many quantizations).
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise _unavailable(repo_id, revision, "huggingface_hub is not installed") from exc

    allow_patterns = [gguf_file] if gguf_file else list(HUB_ALLOW_PATTERNS)
    offline = hub_offline()
    reason_if_missing = "offline mode (HF_HUB_OFFLINE) is on and it is not in the local hub cache"
    if not offline and not _endpoint_reachable():
        offline = True
        reason_if_missing = "the hub cannot be reached and it is not in the local hub cache"
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow_patterns,
            local_files_only=offline,
        )
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        from huggingface_hub.errors import LocalEntryNotFoundError

        if offline and isinstance(exc, LocalEntryNotFoundError):
            reason = reason_if_missing
        else:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
        raise _unavailable(repo_id, revision, reason) from exc
    return Path(path)
