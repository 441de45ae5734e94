"""Keep secrets out of every backend: hyperparameters, command lines and URLs often carry them.

A value is redacted when its key names a secret (api_key, *_token, password, private_key, ...)
and, under any key, where its shape is one (bearer/basic credentials, a password in a URL, a
`--api-key X` flag, well-known token prefixes such as sk-, ghp_, xoxb-, AKIA, hf_).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence, Set
from types import SimpleNamespace
from typing import Any

REDACTED = "***REDACTED***"
MAX_DEPTH = 32  # deeper than any real config; guards against pathological nesting
TOO_DEEP = f"<nested deeper than {MAX_DEPTH} levels: not shown>"
CYCLE = "<cycle: not shown>"

# A key is split into words (snake, kebab, dots, camelCase): `author` is one word, not `auth`.
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SECRET_WORDS = frozenset(
    "password passwords passwd passphrase secret secrets credential credentials apikey apikeys "
    "auth authorization authentication oauth cookie cookies privatekey".split()
)
# `<qualifier>_key` is a secret (private_key, ssh_key, aws_access_key_id); a bare `key` is not.
_KEY_QUALIFIERS = frozenset(
    "api private ssh access secret signing encryption master deploy gpg pgp rsa license app "
    "session".split()
)
# `token` is a secret (hf_token, session_token) except in counting and tokenizer vocabulary.
_TOKEN_NOT_SECRET_BEFORE = frozenset(
    "num n max min total pad bos eos eot unk sep cls mask special start end first last new "
    "per image vocab".split()
)
_TOKEN_NOT_SECRET_AFTER = frozenset(
    "count counts length len limit limits budget id ids type types index idx size embedding "
    "embeddings level per".split()
)


def _words(key: str) -> list[str]:
    return [word.lower() for word in _WORD.findall(key)]


def is_secret_key(key: str) -> bool:
    """Whether a key (mapping key, attribute, flag or variable name) names a secret."""
    words = _words(key)
    for index, word in enumerate(words):
        before = words[index - 1] if index else ""
        after = words[index + 1] if index + 1 < len(words) else ""
        if word in _SECRET_WORDS:
            return True
        if word in ("key", "keys") and before in _KEY_QUALIFIERS:
            return True
        if word == "token" and not (
            before in _TOKEN_NOT_SECRET_BEFORE or after in _TOKEN_NOT_SECRET_AFTER
        ):
            return True
    return False


# -- secrets recognised by their shape, under any key --------------------------------------
_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?"
    r"(-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|\Z)",
    re.DOTALL,
)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^@/?#\s]+(?=@)")
# `name=value`, `name: value`, `"name": "value"` in free text; only the name+separator is
# consumed by the scan, so `https://host/?api_key=X` still finds `api_key=`.
_NAME_SEPARATOR = re.compile(
    r"(?<![A-Za-z0-9_.])(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)[\"']?\s*[=:]\s*[\"']?"
)
_NAMED_VALUE = re.compile(r"(?:(?:Bearer|Basic|Token|Digest)\s+)?[^\s\"',;&]+", re.IGNORECASE)
_FLAG_VALUE = re.compile(r"(?P<head>(?P<flag>--?[A-Za-z][A-Za-z0-9_-]*)\s+)(?P<value>[^\s\"'-]\S*)")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.IGNORECASE)
_BASIC = re.compile(r"(?P<head>\bBasic\s+)(?P<value>[A-Za-z0-9+/]{4,}={0,2})(?![A-Za-z0-9+/=])")
_TOKEN_PREFIXES = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"sk-[A-Za-z0-9_-]{16,}"  # OpenAI / Anthropic
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}"  # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|npm_[A-Za-z0-9]{36}|pypi-[A-Za-z0-9_-]{50,}"  # npm, PyPI
    r"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"  # JWT
    r")"
)


def _redact_named_values(text: str) -> str:
    parts: list[str] = []
    done = 0
    for match in _NAME_SEPARATOR.finditer(text):
        if match.start() < done or not is_secret_key(match["name"]):
            continue
        value = _NAMED_VALUE.match(text, match.end())
        if value is None:
            continue
        parts += (text[done : match.end()], REDACTED)
        done = value.end()
    parts.append(text[done:])
    return "".join(parts)


def _flag_value(match: re.Match[str]) -> str:
    return match["head"] + REDACTED if is_secret_key(match["flag"]) else match[0]


def _bearer(match: re.Match[str]) -> str:
    value = match["value"]
    # A credential, not prose ("Bearer authentication"): it has a digit or a symbol in it.
    return match["head"] + REDACTED if re.search(r"[0-9._~+/=-]", value) else match[0]


def _basic(match: re.Match[str]) -> str:
    # Basic credentials are base64("user:password"): decode to tell them from prose.
    value = match["value"]
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return match[0]
    return match["head"] + REDACTED if b":" in decoded else match[0]


_SHAPE_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str] | str], ...] = (
    (_FLAG_VALUE, _flag_value),
    (_BEARER, _bearer),
    (_BASIC, _basic),
    (_TOKEN_PREFIXES, REDACTED),
)


def redact_text(text: str) -> str:
    """`text` with every secret recognised by its shape replaced (the rest kept, for context)."""
    text = _PRIVATE_KEY_BLOCK.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(r"\g<head>" + REDACTED, text)
    text = _redact_named_values(text)
    for pattern, replacement in _SHAPE_RULES:
        text = pattern.sub(replacement, text)
    return text


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line with secret flags' values replaced: `--api-key X` and `--api-key=X`."""
    redacted: list[str] = redact([str(item) for item in argv])
    return redacted


def redact(config: Any) -> Any:
    """A JSON-friendly copy of `config` with every secret replaced by `REDACTED`.

    Walks mappings, lists/tuples/sets, argparse / SimpleNamespace objects, dataclasses, named
    tuples and pydantic-style models (`model_dump()`); anything else is shown by `str()`, itself
    scanned. Nesting deeper than MAX_DEPTH and cycles are replaced by a marker.
    """
    return _redact(config, 0, set())


def _redact(value: Any, depth: int, seen: set[int]) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, (bytes, bytearray)):
        return redact_text(bytes(value).decode("utf-8", errors="replace"))
    if depth >= MAX_DEPTH:
        return TOO_DEEP
    if id(value) in seen:
        return CYCLE
    seen.add(id(value))
    try:
        return _redact_container(value, depth + 1, seen)
    finally:
        seen.discard(id(value))


def _redact_container(value: Any, depth: int, seen: set[int]) -> Any:
    fields = _named_fields(value)
    if fields is not None:
        return {
            str(key): (REDACTED if is_secret_key(str(key)) else _redact(item, depth, seen))
            for key, item in fields
        }
    if isinstance(value, (list, tuple)):
        items = [_redact(item, depth, seen) for item in value]
        return _hide_flag_values(value, items)
    if isinstance(value, Set):
        return [_redact(item, depth, seen) for item in value]
    return redact_text(str(value))  # shown, not serialised by reference


def _named_fields(value: Any) -> list[tuple[Any, Any]] | None:
    """(name, value) pairs of the things whose keys are names: mappings and objects."""
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, SimpleNamespace) or _is_argparse_namespace(value):
        return list(vars(value).items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [
            (field.name, getattr(value, field.name, None)) for field in dataclasses.fields(value)
        ]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return list(zip(value._fields, value, strict=False))
    dump = getattr(value, "model_dump", None)  # pydantic v2 models
    if callable(dump) and not isinstance(value, type):
        try:
            dumped = dump()
        except Exception:  # not a pydantic model after all: shown by str() instead
            return None
        if isinstance(dumped, Mapping):
            return list(dumped.items())
    return None


def _is_argparse_namespace(value: Any) -> bool:
    import argparse

    return isinstance(value, argparse.Namespace)


def _hide_flag_values(original: Sequence[Any], items: list[Any]) -> list[Any]:
    """In an argv-like list, the item after a secret flag (`"--api-key", X`) is a secret."""
    for index in range(len(original) - 1):
        flag = original[index]
        if (
            isinstance(flag, str)
            and flag.startswith("-")
            and "=" not in flag
            and is_secret_key(flag)
            and not (isinstance(original[index + 1], str) and original[index + 1].startswith("--"))
        ):
            items[index + 1] = REDACTED
    return items
