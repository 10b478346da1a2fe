"""Names AWS IoT gives rules to, checked the same way by the hub and the cloud."""

from __future__ import annotations

import re
from typing import Final

MAX_THING_NAME: Final = 128
MAX_SHADOW_NAME: Final = 64
NAME_PATTERN: Final = re.compile(r"[a-zA-Z0-9:_-]+")  # things and shadows alike


def is_thing_name(name: object) -> bool:
    """True when AWS IoT would accept ``name`` as a thing name."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_THING_NAME
        and NAME_PATTERN.fullmatch(name) is not None
    )
