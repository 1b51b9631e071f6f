"""Settings from a TOML config file, overridden by the command line.

Every key has a command-line twin.  An unknown key or a wrong type is a configuration
error naming the file and the key, and nothing starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

DEFAULT_INTERNAL = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"]


class ConfigError(Exception):
    pass


@dataclass
class Settings:
    signatures: list[str] = field(default_factory=list)
    internal: list[str] = field(default_factory=list)
    resolvers: list[str] = field(default_factory=list)
    state: str | None = None
    no_state: bool = False
    outputs: list[str] = field(default_factory=list)
    spool_dir: str | None = None
    suppress_window: float = 3600.0
    inventory_interval: float = 3600.0
    dedup_window: float = 0.05
    dormant_days: float = 14.0
    answer_grace: float = 300.0
    observer: str | None = None
    metrics: str | None = None
    metrics_tls_cert: str | None = None
    metrics_tls_key: str | None = None
    metrics_basic_auth_user: str | None = None
    metrics_basic_auth_hash: str | None = None
    metrics_host_cap: int = 1000
    linger: bool = False
    removal_start: str | None = None  # ISO date removal began (BOD 17-01 milestones, alert rules)


_SECTIONS = {
    "sensor": {"signatures", "internal", "resolvers", "observer", "dedup_window", "dormant_days",
               "answer_grace", "removal_start"},
    "state": {"path": "state"},
    "output": {"outputs", "spool_dir", "suppress_window", "inventory_interval"},
    "metrics": {"listen": "metrics", "tls_cert": "metrics_tls_cert", "tls_key": "metrics_tls_key",
                "basic_auth_user": "metrics_basic_auth_user",
                "basic_auth_hash": "metrics_basic_auth_hash", "host_cap": "metrics_host_cap"},
}


def _types() -> dict[str, type]:
    out = {}
    for f in fields(Settings):
        t = str(f.type)
        out[f.name] = list if t.startswith("list") else float if t == "float" else \
            int if t == "int" else bool if t == "bool" else str
    return out


def load_config(path: str) -> dict:
    """Parse the file into Settings field values; raise ConfigError naming file and key."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
    types = _types()
    values: dict = {}
    for section, body in raw.items():
        allowed = _SECTIONS.get(section)
        if allowed is None:
            raise ConfigError(f"{path}: unknown section [{section}] "
                              f"(known: {', '.join(sorted(_SECTIONS))})")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: '{section}' must be a table")
        for key, value in body.items():
            if key not in allowed:
                raise ConfigError(f"{path}: unknown key '{section}.{key}'")
            name = allowed[key] if isinstance(allowed, dict) else key
            want = types[name]
            ok = isinstance(value, want) or (want is float and isinstance(value, int)
                                             and not isinstance(value, bool))
            if want is list:
                ok = ok and all(isinstance(v, str) for v in value)
            if not ok:
                raise ConfigError(f"{path}: '{section}.{key}' must be "
                                  f"{'a list of strings' if want is list else want.__name__}")
            values[name] = float(value) if want is float else value
    return values
