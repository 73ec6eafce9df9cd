"""User names -> prefix names. A prefix name is what a request's `model` field says, so it must be a valid
store name (serve/tenants.py); a user id such as an e-mail address is mapped to one, never silently merged."""
from __future__ import annotations

import re

from ..serve.tenants import NAME_PATTERN, valid_name


def prefix_name(user) -> str:
    """The prefix name for a user: the user id itself when valid, else every run of other characters
    replaced by '-' (alice@example.com -> alice-example.com), cut to 64 characters."""
    user = str(user)
    if valid_name(user):
        return user
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", user).strip("-._")[:64]
    return name


def prefix_names(users, reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """user -> prefix name for every user; a ValueError names the users that cannot get a name of their own
    (nothing left after mapping, two users mapped to one name or to names that differ only in case, or a
    reserved name such as the base model's)."""
    names, owner, problems = {}, {}, []
    for user in users:
        name = prefix_name(user)
        # names are compared without case: on a case-insensitive file system (macOS, Windows) 'Ann.safetensors'
        # and 'ann.safetensors' are one file, and one user's prefix would be served as the other's
        key = name.lower()
        if not valid_name(name):
            problems.append(f"user {str(user)!r} has no usable prefix name ({NAME_PATTERN})")
        elif name in reserved:
            problems.append(f"user {str(user)!r} would be named {name!r}, the base model's name (reserved)")
        elif key in owner and names[str(owner[key])] == name:
            problems.append(f"users {str(owner[key])!r} and {str(user)!r} would both be named {name!r}")
        elif key in owner:
            problems.append(f"users {str(owner[key])!r} and {str(user)!r} would be named {names[str(owner[key])]!r} "
                            f"and {name!r}, which differ only in case (one file on a case-insensitive file system)")
        else:
            owner[key] = user
            names[str(user)] = name
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("; ".join(problems[:5]) + more)
    return names
