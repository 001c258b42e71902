"""Registry credentials and the pure parts of registry auth (no I/O but the credentials-file reader).

* :class:`Credentials`: username/password (basic, or exchanged for a bearer token) or a ready
  identity/registry token. ``repr``/``str`` never show a secret.
* :func:`credentials_from_docker_config`: pull secrets (``.dockerconfigjson`` and the legacy
  ``.dockercfg``) to the credentials for one registry host.
* :func:`parse_challenge`: a ``WWW-Authenticate`` header to scheme + parameters.
* :func:`read_credentials_file`: the one reader of a ``{username, password}`` file mounted from a
  Secret (every command's ``--credentials-file``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster_registry.errors import ConfigError

_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True)
class Credentials:
    """Credentials for one registry. Give ``username`` + ``password``, or ``token``.

    ``token`` is an OAuth2 refresh/identity token (docker config ``identitytoken``) exchanged at the
    token service, or, with ``token_is_bearer=True``, a bearer token sent as is (``registrytoken``).
    """

    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    token_is_bearer: bool = False

    def __repr__(self) -> str:
        kind = "token" if self.token else ("basic" if self.username else "anonymous")
        return f"Credentials(username={self.username!r}, kind={kind}, secret=***)"

    __str__ = __repr__

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.token)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def read_credentials_file(path: str) -> Credentials:
    """``{username, password}`` from a YAML (or JSON) file; ConfigError naming the file otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the credentials file {path}: {type(err).__name__}") from err
    if not isinstance(data, dict) or not data.get("username") or data.get("password") is None:
        raise ConfigError(f"the credentials file {path} must hold a mapping with 'username' and 'password'")
    return Credentials(username=str(data["username"]), password=str(data["password"]))


def _host_of(key: str) -> str:
    """A docker config key (``https://index.docker.io/v1/``, ``host:5000``, ``http://h/x``) to a host."""
    key = key.strip()
    key = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key)
    host = key.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB_ALIASES else host


def _entry_credentials(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=False).decode()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise ConfigError("docker config: an 'auth' field is not base64 of 'user:password'") from err
        if ":" not in decoded:
            raise ConfigError("docker config: an 'auth' field does not decode to 'user:password'")
        username, password = decoded.split(":", 1)
    if entry.get("identitytoken"):
        return Credentials(username=username, token=str(entry["identitytoken"]))
    if entry.get("registrytoken"):
        return Credentials(username=username, token=str(entry["registrytoken"]), token_is_bearer=True)
    if username or password:
        return Credentials(username=username, password=password)
    return None


def credentials_from_docker_config(data: bytes | str, host: str) -> Credentials | None:
    """The credentials a docker config (``.dockerconfigjson`` or ``.dockercfg``) holds for ``host``.

    ``host`` is a registry host as in a reference (``docker.io``, ``ghcr.io``, ``reg:5000``). Keys
    may carry a scheme and path (``https://index.docker.io/v1/``). Returns None when no entry
    matches. Raises ConfigError on malformed JSON; the message never contains secret material.
    """
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise ConfigError(f"docker config is not valid JSON (line {getattr(err, 'lineno', '?')})") from None
    if not isinstance(doc, dict):
        raise ConfigError("docker config is not a JSON object")
    auths = doc["auths"] if isinstance(doc.get("auths"), dict) else doc  # .dockerconfigjson vs .dockercfg
    want = _host_of(host)
    for key, entry in auths.items():
        if isinstance(key, str) and _host_of(key) == want:
            creds = _entry_credentials(entry)
            if creds is not None:
                return creds
    return None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-case: "basic" or "bearer"
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


_PARAM = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')


def parse_challenge(header: str) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` challenge: ``Bearer realm="...",service="...",scope="..."``."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def scope(repository: str, push: bool) -> str:
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"
