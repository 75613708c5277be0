"""Object parameters and permissions, as xo-server's ``resolve`` and ACL checks apply them before a method runs.

Ids resolve through XO's cache (never the truth): an id the cache does not show is code 1 even if XAPI
has it. Then, for a user who is not an admin, every resolved object that needs a permission is code 2:
this simulator models users without ACLs, so a non-admin may read (``xo.getAllObjects``) but not write
(XO-STREAMS-AND-CACHE §E2). Admins skip object checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import no_such_object, unauthorized
from .model import ObjectStore
from .shapes import XoObject


@dataclass(frozen=True)
class Resolve:
    """One resolve entry: parameter ``param`` names an object of ``types``, handed to the method as ``key``.

    ``permission`` is the object-level permission a non-admin needs (None: none). ``same_pool_as`` makes
    the object resolve only in the pool of an earlier entry (``vdi.migrate`` looks the SR up in the VDI's pool).
    """

    key: str
    param: str
    types: tuple[str, ...]
    permission: str | None = "administrate"
    same_pool_as: str | None = None


def is_admin(user: Mapping[str, Any] | None) -> bool:
    """Whether the signed-in user has XO's ``admin`` permission."""
    return user is not None and user.get("permission") == "admin"


def resolve(cache: ObjectStore, entries: Sequence[Resolve], params: Mapping[str, Any],
            user: Mapping[str, Any] | None) -> dict[str, XoObject]:
    """The objects named by ``params`` (absent optional ones skipped); code 1, then code 2, as XO orders them."""
    objects: dict[str, XoObject] = {}
    for entry in entries:
        if entry.param not in params:
            continue
        obj_id = params[entry.param]
        obj = cache.get(obj_id, *entry.types)
        anchor = objects.get(entry.same_pool_as) if entry.same_pool_as else None
        if anchor is not None and obj["$pool"] != anchor["$pool"]:
            raise no_such_object(obj_id, entry.types[0] if len(entry.types) == 1 else list(entry.types))
        objects[entry.key] = obj
    if not is_admin(user):
        for entry in entries:
            denied = objects.get(entry.key)
            if denied is not None and entry.permission is not None:
                raise unauthorized(entry.permission, denied["id"], denied["type"])
    return objects
