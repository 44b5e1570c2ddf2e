"""Secret environment values: sealed with Fernet under state_dir/secret.key, masked on the way out.

A sealed value is `fernet:<token>` and is what the database, the routing table and every API
response hold; the plaintext exists only in the environment handed to a worker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
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
                    raise _kept(param, f"{param}.{name}")
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
    """`record` with the values under `field` masked, those of secret-looking names in `environ`,
    and secret-looking values in `extra_args` and `command` (for responses, events and logs)."""
    out = dict(record)
    if isinstance(record.get(field), Mapping):
        out[field] = mask(record[field])
    if isinstance(record.get("environ"), Mapping):
        out["environ"] = mask_environ(record["environ"])
    for name in ("extra_args", "command"):
        if isinstance(record.get(name), list):
            out[name] = mask_argv(record[name])
    return out


def restore_masked(spec: Mapping[str, Any], current: Mapping[str, Any] | None) -> dict[str, Any]:
    """What changes in `spec`'s environ, extra_args and command when the values sent back masked, as
    they were shown, are the stored ones of the endpoint row `current` again (an empty dict: nothing
    was masked). A masked environ name that only the model folder sets is left to the folder again.
    422 for a mask with nothing stored behind it."""
    stored: Mapping[str, Any] = (current or {}).get("spec") or {}
    changes: dict[str, Any] = {}
    environ = spec.get("environ")
    if environ:
        restored = unmask_environ(environ, stored.get("environ") or {}, ((current or {}).get("config") or {}).get("environ") or {})
        if restored != environ:
            changes["environ"] = restored
    for name in ("extra_args", "command"):
        argv = spec.get(name)
        if argv:
            restored_argv = unmask_argv(argv, stored.get(name) or [], param=name)
            if restored_argv != list(argv):
                changes[name] = restored_argv
    return changes


def _kept(param: str, where: str) -> ApplianceError:
    return ApplianceError(f"{where}: {MASK} means 'keep the stored value', but none is stored", status=422, code="invalid_secret", param=param)


# Environment names whose value is a credential: HF_TOKEN, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY,
# DB_PASSWORD, PGPASSWORD, *_KEY … (not TOKENIZERS_PARALLELISM, MAX_TOKENS or PWD).
_SECRET_NAME = re.compile(
    r"token(_|$)|secret|passw(or)?d|passphrase|credential|(^|_)pass(_|$)|_pwd$|(^|_)key$"
    r"|(api|access|private|secret|auth|signing|encryption|master|license|session|client|account)_?key",
    re.IGNORECASE,
)


def secret_name(name: str) -> bool:
    """An environment variable name that looks like it holds a credential."""
    return bool(_SECRET_NAME.search(name))


def mask_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the values of secret-looking names masked."""
    return {k: MASK if secret_name(k) else v for k, v in environ.items()}


def unmask_environ(new: Mapping[str, str], old: Mapping[str, str], inherited: Mapping[str, str], *, param: str = "environ") -> dict[str, str]:
    """`new` with each secret-looking name sent back masked given its stored value; one that only the
    model folder sets is dropped (the folder's value applies again)."""
    out: dict[str, str] = {}
    for name, value in new.items():
        if value != MASK or not secret_name(name):
            out[name] = value
        elif name in old:
            out[name] = old[name]
        elif name not in inherited:
            raise _kept(param, f"{param}.{name}")
    return out


# Flags whose value is a credential: --api-key, --hf-token, --secret, --password, and their kin; the
# word ends the flag's name or one of its parts (--hf-token-file, but not --max-tokens or --tokenizer).
_SECRET_FLAG = re.compile(
    r"^--?[\w.-]*?(api[-_]?key|access[-_]?key|private[-_]?key|token|secrets?|password|passwd|passphrase|credentials?)([-_.][\w.-]*)?$",
    re.IGNORECASE,
)
_ENV_NAME = re.compile(r"[A-Za-z_]\w*")
# Inside a string (`bash -c "vllm serve --api-key X"`, "python serve.py --hf-token=X"): a flag and its
# value, or NAME=value, each at the start of a shell word. A value is one shell word.
_KEY_IN_TEXT = re.compile(r"""(?<![^\s;&|(`"'])(?:(?P<flag>--?[A-Za-z][\w.-]*)(?:=|[ \t]+)|(?P<name>[A-Za-z_]\w*)=)""")
_VALUE = {  # by the quote the value stands in: it ends where that quote closes
    "": re.compile(r"""(?:"[^"]*"|'[^']*'|\\.|[^\s"'\\;&|<>()`])+"""),
    '"': re.compile(r"""(?:'[^'"]*'|\\.|[^\s"\\])+"""),
    "'": re.compile(r"""(?:"[^"']*"|[^\s'])+"""),
}
_TRAILING_FLAG = re.compile(r"""(?:^|[\s"'])(--?[A-Za-z][\w.-]*)\s*$""")
_MASKS = (MASK, f'"{MASK}"', f"'{MASK}'")

Replace = Callable[[str, str], str]  # (flag or name, the value as written) -> what is written instead


def _secret_flag(arg: str) -> bool:
    return bool(_SECRET_FLAG.match(arg))


def _hide(raw: str) -> str:
    """The mask in place of a value, inside the quotes it had (the shell string keeps its shape)."""
    if len(raw) >= 2 and raw[0] in "\"'" and raw[-1] == raw[0] and raw.count(raw[0]) == 2:
        return raw[0] + MASK + raw[0]
    return MASK


def _open_quote(text: str, end: int) -> str:
    """The quote open at `end` in the shell string `text` ("" when none)."""
    quote, i = "", 0
    while i < end:
        c = text[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        i += 1
    return quote


def _walk_text(text: str, replace: Replace) -> tuple[str, str | None]:
    """`text` with each secret value in it replaced, and the secret flag that ends it with no value (its
    value is the next argument), if any."""
    parts: list[str] = []
    pos = 0
    for m in _KEY_IN_TEXT.finditer(text):
        if m.start() < pos:
            continue  # inside a value already replaced
        key = m.group("flag") or m.group("name")
        if not (_secret_flag(key) if m.group("flag") else secret_name(key)):
            continue
        value = _VALUE[_open_quote(text, m.start())].match(text, m.end())
        if value is None:
            continue
        parts += [text[pos:value.start()], replace(key, value.group())]
        pos = value.end()
    parts.append(text[pos:])
    tail = _TRAILING_FLAG.search(text, pos)
    return "".join(parts), (tail.group(1) if tail and _secret_flag(tail.group(1)) else None)


def _walk_argv(argv: Sequence[str], replace: Replace) -> list[str]:
    out: list[str] = []
    pending: str | None = None  # a secret flag whose value is this argument
    for arg in argv:
        if pending is not None:
            out.append(replace(pending, arg))
            pending = None
            continue
        if _secret_flag(arg):
            out.append(arg)
            pending = arg
            continue
        key, eq, value = arg.partition("=")
        if eq and (_secret_flag(key) or (_ENV_NAME.fullmatch(key) and secret_name(key) and not any(c.isspace() for c in value))):
            out.append(f"{key}={replace(key, value)}")  # --hf-token=X, or HF_TOKEN=X as `env` takes it
            continue
        text, pending = _walk_text(arg, replace)
        out.append(text)
    return out


def mask_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the values of secret-looking flags replaced by the mask (`--api-key X`,
    `--hf-token=X`), also inside an argument that is a shell string (`bash -c "vllm serve --api-key X"`),
    and NAME=value where NAME looks secret (`HF_TOKEN=X python serve.py`). The process itself still
    sees them, and so does /proc/*/cmdline: secrets belong in secret_environ."""
    return _walk_argv(argv, lambda _key, raw: _hide(raw))


def unmask_argv(new: Sequence[str], old: Sequence[str], *, param: str) -> list[str]:
    """`new` with each secret value sent back masked, as shown, given the stored one of `old` again:
    matched by flag or name, in order."""
    stored: dict[str, list[str]] = {}

    def keep(key: str, raw: str) -> str:
        stored.setdefault(key, []).append(raw)
        return raw

    def restore(key: str, raw: str) -> str:
        if raw not in _MASKS:
            return raw
        if not stored.get(key):
            raise _kept(param, f"{param}, the value of {key}")
        return stored[key].pop(0)

    _walk_argv(old, keep)
    return _walk_argv(new, restore)
