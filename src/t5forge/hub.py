"""The Hugging Face Hub, asked once: is it there, and downloads that fail fast when it is not.

Without a network, `datasets` retries each request for about half a minute and `huggingface_hub`
waits on its own timeouts before the real error comes. So before any Hub request t5forge decides
once per process whether the Hub can be used:
- `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` / `TRANSFORMERS_OFFLINE` set to 1 (the libraries' own
  switches) mean offline;
- otherwise one HTTPS request to the Hub's endpoint (`HF_ENDPOINT`, proxies as configured) with a
  short timeout: no answer, no DNS or a refused connection mean offline. Any HTTP answer, even an
  error status, means the Hub is there and the libraries handle the rest.

Offline, models and tokenizers still come from the local Hugging Face cache when they were
downloaded before; a Hub dataset cannot be streamed, so the caller says at once what to use instead.
"""

from __future__ import annotations

import functools
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from t5forge.errors import T5ForgeError

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


class HubUnavailable(T5ForgeError):
    """The Hub could not be used for a download; the message says why (the caller adds what to do)."""


def _switched_off() -> str | None:
    for name in OFFLINE_SWITCHES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]} is set"
    return None


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _probe(url: str, timeout: float) -> str | None:
    """None when `url` answers over HTTP; else why not. Runs in a thread because name lookup has no
    timeout of its own."""
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # an answer: the Hub is reachable
            outcome.append(None)
        except urllib.error.URLError as err:
            reason = err.reason
            # A TLS problem is not "offline": let the libraries try and report it themselves.
            outcome.append(None if "SSL" in type(reason).__name__ else f"{type(reason).__name__}: {reason}")
        except OSError as err:  # a timeout while reading the answer
            outcome.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


@functools.lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """Why the Hub cannot be used in this process (one short clause), or None when it can."""
    switched = _switched_off()
    if switched:
        return switched
    endpoint = _endpoint()
    failure = _probe(endpoint, PROBE_TIMEOUT_S)
    return f"{endpoint} cannot be reached ({failure})" if failure else None


def snapshot(repo_id: str, allow_patterns: list[str]) -> Path:
    """The local folder of a Hub model repo's files: downloaded when the Hub is reachable, else taken
    from the local Hugging Face cache. Raises HubUnavailable saying what went wrong."""
    from huggingface_hub import snapshot_download

    reason = offline_reason()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=reason is not None))
    except Exception as err:  # offline and not cached, unknown repo, auth
        if reason is not None:
            raise HubUnavailable(f"the Hugging Face Hub is not available ({reason}) and the local Hugging Face "
                                 "cache holds no copy") from None
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise HubUnavailable(f"it could not be fetched from the Hugging Face Hub "
                             f"({type(err).__name__}: {first_line})") from None


def require_hub(what: str, advice: str) -> None:
    """Raise at once, with `advice`, when `what` (e.g. "dataset 'allenai/c4'") needs a Hub that is not there."""
    reason = offline_reason()
    if reason is not None:
        raise HubUnavailable(f"{what} is streamed from the Hugging Face Hub, which is not available ({reason}); {advice}")
