"""Node config files (/etc/edgezmq/<name>.yaml) and the systemd unit that runs a node from one.

    control: tcp://0.0.0.0:5550      # REP control address to bind
    name: board-1
    threads: 4
    memory_limit: 6GB                # or bytes; refuse shards that need more
    advertise: 10.0.0.11             # host peers use to reach this node's data socket
    cache_dir: /var/cache/edgezmq    # profiles and seeded checkpoints ($EDGEZMQ_CACHE)
    metrics_port: 9550               # opt-in Prometheus endpoint
    metrics_host: 0.0.0.0
    log_level: info                  # debug | info | warning | error
    keys:                            # CurveZMQ: --secret-key / --allow (docs/security.md)
      secret_key_file: ${CREDENTIALS_DIRECTORY}/node.key_secret   # $VARS and ~ expand
      public_key_file: /etc/edgezmq/keys/board-1.key             # accepted; the secret file holds it too
      allowed_clients_dir: /etc/edgezmq/keys/clients

Every field is optional.  ``edgezmq node --config FILE [flags]``: a flag given on the
command line wins over the file, the file wins over the defaults (``DEFAULTS``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgezmq.errors import EdgezmqError
from edgezmq.fields import Fields, prefixed, read_yaml
from edgezmq.paths import CACHE_ENV
from edgezmq.terms import MAX_PORT, MAX_THREADS

CONFIG_DIR = "/etc/edgezmq"
UNIT_DIR = "/etc/systemd/system"
UNIT_NAME = "edgezmq-node@.service"  # template: one instance per config, edgezmq-node@<name>
DEFAULT_EXEC = "/opt/edgezmq/bin/edgezmq"  # where nodes/install.sh puts the console script
DEFAULT_CONTROL = "tcp://127.0.0.1:5550"
DEFAULT_METRICS_HOST = "127.0.0.1"  # metrics name models and runs: expose to the LAN on purpose only
STOP_TIMEOUT_S = 30  # node drain (stage.DRAIN_TIMEOUT_S, 10 s) + joining its threads + margin
RESTART_SEC = 5
LOG_LEVELS = ("debug", "info", "warning", "error")
KEY_FIELDS = ("secret_key_file", "public_key_file", "allowed_clients_dir")
KEY_FLAGS = {"secret_key": "secret_key_file", "allow": "allowed_clients_dir"}  # node flag -> keys field

# field -> default; the keys of a node config and of node_args_from()'s result
DEFAULTS: dict[str, Any] = {
    "control": DEFAULT_CONTROL,
    "name": None,
    "threads": None,
    "memory_limit": None,
    "advertise": None,
    "cache_dir": None,
    "weights_dirs": None,
    "metrics_port": None,
    "metrics_host": DEFAULT_METRICS_HOST,
    "log_level": None,
    "keys": None,
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # usable as a systemd instance and file name


class NodeConfigError(EdgezmqError, ValueError):
    """A node config that cannot be used; the message names the file and the field."""


F = Fields(prefixed(NodeConfigError))


def parse_node_config(d: Any, source: str = "node config") -> dict[str, Any]:
    """Validate a node config mapping; returns only the fields it sets."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise NodeConfigError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
    unknown = sorted(set(map(str, d)) - set(DEFAULTS))
    if unknown:
        raise NodeConfigError(f"{source}: unknown field(s) {unknown} (known: {sorted(DEFAULTS)})")
    out: dict[str, Any] = {}
    for key, v in d.items():
        if v is None:
            continue
        where = f"{source}: {key}"
        if key == "control":
            F.address(v, where, ("tcp://", "ipc://"))
        elif key == "name":
            if not isinstance(v, str) or not _NAME_RE.match(v):
                raise NodeConfigError(f"{where}: expected letters, digits, '.', '_' or '-', got {v!r}")
        elif key == "threads":
            v = F.integer(v, where, lo=1, hi=MAX_THREADS)
        elif key == "memory_limit":
            v = F.size(v, where)
        elif key == "metrics_port":
            v = F.integer(v, where, lo=0, hi=MAX_PORT)
        elif key == "log_level":
            v = F.choice(v.lower() if isinstance(v, str) else v, where, LOG_LEVELS)
        elif key == "keys":
            v = _keys(v, where)
        elif key == "cache_dir":
            v = F.path(v, where)
        elif key == "weights_dirs":
            v = [F.path(d, f"{where}[{i}]") for i, d in enumerate(F.seq(v, where, nonempty=True))]
        else:  # advertise, metrics_host
            v = F.string(v, where)
        out[key] = v
    return out


def _keys(v: Any, where: str) -> dict[str, str]:
    # CURVE is a later issue: check the shape now so that configs written today stay valid
    return {k: F.path(p, f"{where}.{k}") for k, p in F.mapping(v, where, KEY_FIELDS).items() if p is not None}


def load_node_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a node config file; NodeConfigError names the file and field."""
    return parse_node_config(read_yaml(path, NodeConfigError, "node config"), source=str(path))


def apply_to_args(cfg: dict[str, Any], args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``args`` from ``cfg`` where no flag was given (a flag is given when not None)."""
    for key, v in cfg.items():
        if getattr(args, key, None) is None:
            setattr(args, key, v)
    return args


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Flags, then ``args.config``'s file, then DEFAULTS: the node's settings as a dict."""
    path = getattr(args, "config", None)
    merged = argparse.Namespace(**{k: getattr(args, k, None) for k in DEFAULTS})
    if path:
        apply_to_args(load_node_config(path), merged)
    apply_to_args(DEFAULTS, merged)
    out = vars(merged)
    out["config"] = path
    # the CurveZMQ flags of `edgezmq node` (--secret-key, --allow) and their config fields
    keys = out["keys"] or {}
    for flag, key in KEY_FLAGS.items():
        given = getattr(args, flag, None)
        out[flag] = given if given is not None else keys.get(key)
    return out


def apply_process_settings(opts: dict[str, Any], verbose: int = 0) -> None:
    """Process-wide effects of a node config: the cache root and, unless -v was given, the log level."""
    if opts.get("cache_dir"):
        os.environ[CACHE_ENV] = str(Path(opts["cache_dir"]).expanduser())
    if opts.get("log_level") and not verbose:
        logging.getLogger("edgezmq").setLevel(opts["log_level"].upper())


# ---- the systemd unit --------------------------------------------------------
UNIT_TEMPLATE = """\
# edgezmq stage node: one instance per node config, /etc/edgezmq/<instance>.yaml
#   edgezmq install-service board-1 --config board-1.yaml   (or: sudo nodes/install.sh board-1 board-1.yaml)
#   systemctl enable --now edgezmq-node@board-1;  journalctl -u edgezmq-node@board-1 -f
# Site changes go in a drop-in (systemctl edit edgezmq-node@board-1), not in this file:
# MemoryMax= / CPUQuota= (the node reads its cgroup memory limit into its load budget),
# ReadWritePaths= for a cache_dir outside /var/cache, DeviceAllow= for accelerators, and for
# CurveZMQ LoadCredential=node.key_secret:/etc/edgezmq/keys/<name>.key_secret with
# keys.secret_key_file: ${{CREDENTIALS_DIRECTORY}}/node.key_secret in the config.

[Unit]
Description=edgezmq pipeline stage node %i
Wants=network-online.target
After=network-online.target
AssertPathExists={config_dir}/%i.yaml
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=exec
ExecStart={exec_path} node --config {config_dir}/%i.yaml
Restart=on-failure
RestartSec={restart_sec}
# SIGTERM: the node stops taking input, drains in-flight microbatches, exits 0
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}

# A dynamic user named edgezmq, shared by all instances: no account to manage, no
# writable paths but the ones below.  Create a static user "edgezmq" to use it instead.
DynamicUser=yes
User=edgezmq
# profiles and seeded checkpoints: /var/cache/edgezmq/<instance>
CacheDirectory=edgezmq/%i
Environment=EDGEZMQ_CACHE=/var/cache/edgezmq/%i
Environment=XDG_CACHE_HOME=/var/cache/edgezmq/%i
# checkpoints: any world-readable path, e.g. /opt/edgezmq/checkpoints (the file system is
# read-only to the node but for its cache)
ConfigurationDirectory=edgezmq
Environment=PYTHONUNBUFFERED=1
UMask=0027

NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# Not set: MemoryDenyWriteExecute (oneDNN JIT-compiles kernels into W+X memory) and
# SystemCallFilter (untested with torch's thread pools on every board; add in a drop-in).

MemoryAccounting=yes
CPUAccounting=yes

StandardOutput=journal
StandardError=journal
SyslogIdentifier=edgezmq-%i

[Install]
WantedBy=multi-user.target
"""


def render_unit(exec_path: str = DEFAULT_EXEC, config_dir: str = CONFIG_DIR) -> str:
    """The template unit with ExecStart pointing at ``exec_path`` (the ``edgezmq`` script)."""
    if not os.path.isabs(exec_path):
        raise ValueError(f"ExecStart needs an absolute path, got {exec_path!r}")
    return UNIT_TEMPLATE.format(exec_path=exec_path, config_dir=config_dir.rstrip("/"),
                                restart_sec=RESTART_SEC, stop_timeout=STOP_TIMEOUT_S)


@dataclass
class InstallPlan:
    """What install-service writes (paths already under the root) and the commands to run after."""

    unit_path: Path
    unit_text: str
    config_path: Path
    config_text: str
    commands: list[list[str]]


def example_config(name: str) -> str:
    """A minimal config for a node called ``name`` (when install-service is given none)."""
    return (f"# edgezmq node config (see nodes/example-node.yaml for every field)\n"
            f"name: {name}\ncontrol: tcp://0.0.0.0:5550\n# advertise: 10.0.0.11\n# threads: 4\n")


def plan_install(name: str, config: str | None, *, root: str = "/", exec_path: str = DEFAULT_EXEC) -> InstallPlan:
    """Check the instance name and the config, and say where everything goes under ``root``."""
    if not _NAME_RE.match(name):
        raise NodeConfigError(f"instance name: expected letters, digits, '.', '_' or '-', got {name!r}")
    if config is not None:
        cfg = load_node_config(config)  # a broken config fails here, not at the first boot
        config_text = Path(config).read_text()
        if cfg.get("name") not in (None, name):
            raise NodeConfigError(f"{config}: name: {cfg['name']!r} differs from the instance name {name!r}")
    else:
        config_text = example_config(name)
    base = Path(root)
    instance = f"edgezmq-node@{name}.service"
    return InstallPlan(
        unit_path=base / UNIT_DIR.lstrip("/") / UNIT_NAME,
        unit_text=render_unit(exec_path),
        config_path=base / CONFIG_DIR.lstrip("/") / f"{name}.yaml",
        config_text=config_text,
        commands=[["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", instance]],
    )
