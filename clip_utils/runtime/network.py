"""Network reachability, checked before any download so that offline machines fail in seconds.

Library downloaders (urllib in torchvision, the Hugging Face hub client) either wait on
sockets without a timeout or retry with back-off; one short probe up front turns minutes
of waiting into an immediate, explained error.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlsplit

REACH_TIMEOUT_S = 5.0


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the server of `url` answers within `timeout` seconds, and why not.

    Args:
        url: any address on the server to probe (only scheme and host are used).
        timeout: seconds to wait for the connection.

    Returns:
        `(True, "")` when the server answered (any HTTP status counts), else
        `(False, reason)`.
    """
    parts = urlsplit(url)
    try:
        urllib.request.urlopen(f"{parts.scheme}://{parts.netloc}/", timeout=timeout).close()
        return True, ""
    except urllib.error.HTTPError:
        return True, ""  # an HTTP error status still proves the network is there
    except (urllib.error.URLError, OSError) as err:
        return False, str(getattr(err, "reason", err))
