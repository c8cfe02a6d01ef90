"""CurveZMQ keys, allow-lists and the authenticator: who may talk to a node (see docs/security.md)."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edgezmq.errors import EdgezmqError

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"  # zmq.auth.create_certificates' names: NAME.key, NAME.key_secret
SECRET_SUFFIX = ".key_secret"
SECRET_MODE = 0o600
Z85_KEY_LEN = 40  # a 32-byte Curve25519 key in Z85 text
ANY_DOMAIN = "*"  # one allow-list for every socket of a context
SECTION_FIELDS = ("client", "nodes", "results")  # a plan's or inventory's `keys:` section
# a refused CURVE handshake is silent: say what else than "down" the silence can mean
CURVE_HINT = ("; over CurveZMQ this also means the peer does not allow our public key "
              "or does not hold the key we expect (check its --allow directory and the keys: section)")


class KeyFileError(EdgezmqError, ValueError):
    """A key file or key that cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes

    @property
    def public_text(self) -> str:
        return self.public.decode()


@dataclass(frozen=True)
class Curve:
    """How one socket speaks CURVE: a server (``server_key`` None) or a client of ``server_key``."""

    keys: KeyPair
    server_key: bytes | None = None

    @property
    def is_server(self) -> bool:
        return self.server_key is None


def check_key(key: str | bytes, what: str) -> bytes:
    """A Z85 public key as bytes; KeyFileError if it is not one."""
    k = key.encode() if isinstance(key, str) else bytes(key)
    if len(k) != Z85_KEY_LEN:
        raise KeyFileError(f"{what}: expected a {Z85_KEY_LEN}-character Z85 key, got {len(k)} characters")
    try:
        zmq.utils.z85.decode(k)
    except Exception:
        raise KeyFileError(f"{what}: not a Z85 key: {k[:8]!r}...") from None
    return k


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
        if (d / f"{name}{suffix}").exists():
            raise KeyFileError(f"{d / (name + suffix)} exists; refusing to overwrite a key")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        pub, sec = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(sec, SECRET_MODE)
    return Path(pub), Path(sec)


def load_keypair(path: str | Path) -> KeyPair:
    """A NAME.key_secret file -> its key pair; refuses a secret readable by others."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{p}: cannot read key file ({e})") from None
    if secret is None:
        raise KeyFileError(f"{p}: holds no secret key (give the .key_secret file)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{p}: secret key file has mode {stat.S_IMODE(mode):o}, expected {SECRET_MODE:o}")
    return KeyPair(public=check_key(public, str(p)), secret=secret)


def load_public(path: str | Path) -> bytes:
    p = Path(path)
    try:
        public, _ = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{p}: cannot read public key file ({e})") from None
    return check_key(public, str(p))


def load_public_dir(directory: str | Path) -> dict[str, bytes]:
    """Every NAME.key in ``directory`` -> {NAME: public key}."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"{d}: not a directory of public keys")
    return {p.name[: -len(PUBLIC_SUFFIX)]: load_public(p) for p in sorted(d.glob(f"*{PUBLIC_SUFFIX}"))}


@dataclass
class Keyring:
    """What a bootstrapper or client knows: its own key pair and the nodes' public keys."""

    own: KeyPair
    nodes: dict[str, bytes] = field(default_factory=dict)  # node name -> public key
    results_key: bytes | None = None  # the results receiver's public key (default: own)

    def node_key(self, name: str) -> bytes:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyFileError(f"no public key for node {name!r}; known: {sorted(self.nodes)}") from None

    def client_of(self, name: str) -> Curve:
        return Curve(self.own, server_key=self.node_key(name))

    @property
    def server(self) -> Curve:
        return Curve(self.own)

    @property
    def results_public(self) -> bytes:
        return self.results_key or self.own.public


def client_curve(ring: Keyring | None, name: str) -> Curve | None:
    """How to reach node ``name``'s sockets: a CURVE client of its key, or None (plaintext)."""
    return ring.client_of(name) if ring is not None else None


def parse_keys_section(k: Any, names: list[str], base: str | Path) -> tuple[dict, Keyring]:
    """A plan's or cluster inventory's ``keys:`` mapping (plans/README.md) -> (the section with
    its paths resolved against ``base``, the Keyring).  KeyFileError names the field; every
    node in ``names`` must have its public key in ``keys.nodes``."""
    if not isinstance(k, dict):
        raise KeyFileError(f"keys: expected a mapping of {', '.join(SECTION_FIELDS)}, got {k!r}")
    unknown = sorted(set(k) - set(SECTION_FIELDS), key=repr)  # YAML keys may be any scalar
    if unknown:
        raise KeyFileError(f"keys: unknown field(s) {unknown}; expected {', '.join(SECTION_FIELDS)}")
    resolved: dict[str, str] = {}
    for f in SECTION_FIELDS:
        v = k.get(f)
        if v is not None and not isinstance(v, str):
            raise KeyFileError(f"keys.{f}: expected str, got {type(v).__name__} {v!r}")
        if v:
            resolved[f] = str((Path(base) / Path(v).expanduser()).resolve())
    if "client" not in resolved or "nodes" not in resolved:
        raise KeyFileError("keys: needs client (this side's .key_secret file) and nodes (directory of <node>.key)")
    try:
        own = load_keypair(resolved["client"])
        nodes = load_public_dir(resolved["nodes"])
        results = load_public(resolved["results"]) if "results" in resolved else None
    except KeyFileError as e:
        raise KeyFileError(f"keys: {e}") from None
    missing = [n for n in names if n not in nodes]
    if missing:
        raise KeyFileError(f"keys.nodes: no public key for node(s) {missing} in {resolved['nodes']} "
                           f"(expected <name>{PUBLIC_SUFFIX})")
    return resolved, Keyring(own=own, nodes=nodes, results_key=results)


class Authenticator:
    """One ZAP handler per context: CURVE clients whose public key is in ``allow_dir`` (or
    in ``allow``) get in, everyone else is refused during the handshake."""

    def __init__(self, ctx: zmq.Context, allow_dir: str | Path | None = None,
                 allow: list[bytes] | None = None) -> None:
        if allow_dir is None and not allow:
            raise KeyFileError("an authenticator needs an allow-list (a directory or keys)")
        if allow_dir is not None:
            load_public_dir(allow_dir)  # fail early, with the file named, on a bad key file
        self.allow_dir = str(allow_dir) if allow_dir is not None else None
        self.allow = set(allow or [])
        self._warned: set[tuple[str, float]] = set()  # (key file, its mtime) already reported
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("edgezmq.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ANY_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the ZAP thread with the client's Z85 public key."""
        if key in self.allow:
            return True
        if self.allow_dir is not None:
            return key in self._live_keys(Path(self.allow_dir))  # re-read: keys may be added live
        return False

    def _live_keys(self, d: Path) -> set[bytes]:
        """The allow-list directory's keys now. A key file that cannot be used (added or
        damaged while the node runs) lets nobody in by itself and is reported once (per
        version of the file); the other keys keep working. A directory gone refuses everyone."""
        keys: set[bytes] = set()
        try:
            files = sorted(d.glob(f"*{PUBLIC_SUFFIX}"))
        except OSError as e:
            log.warning("allow-list %s unreadable, refusing every peer: %s", d, e)
            return keys
        for p in files:
            try:
                keys.add(load_public(p))
            except KeyFileError as e:
                try:
                    version = (str(p), p.stat().st_mtime)
                except OSError:
                    continue  # removed meanwhile
                if version not in self._warned:
                    self._warned.add(version)
                    log.warning("allow-list: %s; that key file lets nobody in until it is fixed", e)
        return keys

    def stop(self) -> None:
        self._auth.stop()
