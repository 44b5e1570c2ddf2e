"""Secret environment values: sealed with Fernet under state_dir/secret.key, masked on the way out.

A sealed value is `fernet:<token>` and is what the database, the routing table and every API
response hold; the plaintext exists only in the environment handed to a worker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from appliance.errors import ApplianceError

SEALED = "fernet:"
MASK = "********"


def load_or_create_key(path: Path) -> bytes:
    """The Fernet key in `path`, created 0600 on first use."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


class Vault:
    def __init__(self, key_path: Path) -> None:
        self._path = key_path
        self._fernet: Fernet | None = None

    def _box(self) -> Fernet:
        if self._fernet is None:  # the key file is made on first use, not at import or config load
            self._fernet = Fernet(load_or_create_key(self._path))
        return self._fernet

    def seal(self, plain: str) -> str:
        return SEALED + self._box().encrypt(plain.encode()).decode()

    def open(self, sealed: str) -> str:
        if not sealed.startswith(SEALED):
            raise ApplianceError("a secret value is not sealed", status=500, code="secret_unsealed")
        try:
            return self._box().decrypt(sealed[len(SEALED):].encode()).decode()
        except InvalidToken:
            raise ApplianceError(
                f"a secret value cannot be decrypted with {self._path} (was the key file replaced?); set the secret again",
                status=500, code="secret_undecryptable",
            ) from None

    def seal_all(self, new: Mapping[str, str], old: Mapping[str, str], *, param: str) -> dict[str, str]:
        """Seal `new`, keeping the stored ciphertext of values that did not change (so nothing restarts)."""
        out: dict[str, str] = {}
        for name, value in new.items():
            if value == MASK:  # sent back as shown: keep the stored value
                if name not in old:
                    raise ApplianceError(f"{param}.{name}: {MASK} means 'keep the stored value', but none is stored", status=422, code="invalid_secret", param=param)
                out[name] = old[name]
            elif value.startswith(SEALED):
                self.open(value)  # must be ours
                out[name] = value
            elif name in old and self.open(old[name]) == value:
                out[name] = old[name]
            else:
                out[name] = self.seal(value)
        return out

    def open_all(self, sealed: Mapping[str, str]) -> dict[str, str]:
        return {k: self.open(v) for k, v in sealed.items()}


def mask(values: Mapping[str, Any]) -> dict[str, str]:
    return {k: MASK for k in values}


def masked(record: Mapping[str, Any], field: str = "secret_environ") -> dict[str, Any]:
    """`record` with the values under `field` masked, and secret-looking command arguments
    (for responses, events and logs)."""
    out = dict(record)
    if isinstance(record.get(field), Mapping):
        out[field] = mask(record[field])
    for name in ("extra_args", "command"):
        if isinstance(record.get(name), list):
            out[name] = mask_argv(record[name])
    return out


# Flags whose value is a credential: --api-key, --hf-token, --secret, --password, and their kin.
_SECRET_FLAG = re.compile(r"^--?[\w.-]*(api[-_]?key|token|secret|password|passwd|credential)[\w.-]*$", re.IGNORECASE)


def mask_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the values of secret-looking flags replaced by the mask (`--api-key X`,
    `--hf-token=X`). The process itself still sees them, and so does /proc/*/cmdline: secrets
    belong in secret_environ."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if _SECRET_FLAG.match(flag):
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out
