"""``streamrec models``: list, publish and promote model versions in the registry.

The registry is ``STREAMREC_SERVING_MODELS_ROOT`` (or ``--root``): a local
directory or an fsspec URL (model/registry.py). Promoting rewrites the
``CURRENT`` pointer and tells running servers at once through the Redis
notification channel; a server that misses it swaps at its next poll.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

logger = logging.getLogger(__name__)


def _registry(root: str | None):  # -> (ModelRegistry, ServingSettings)
    from model.registry import ModelRegistry
    from serving.settings import ServingSettings
    from streamrec.settings import load

    settings = load(ServingSettings, **({"models_root": root} if root else {}))
    return ModelRegistry(settings.models_root), settings


def _notify(version: str, channel: str) -> None:
    """Best effort: servers poll the pointer anyway."""
    import redis

    from ingest.redis_conn import make_redis
    from ingest.settings import RedisSettings
    from serving.models import notify_promotion
    from streamrec.settings import load

    redis_settings = load(RedisSettings)
    if not redis_settings.url:
        click.echo("no Redis configured: servers pick the new version up at their next poll",
                   err=True)
        return
    try:
        heard = notify_promotion(make_redis(redis_settings), channel, version)
    except (redis.RedisError, OSError) as e:
        click.echo(f"could not notify servers ({e}); they pick it up at their next poll",
                   err=True)
        return
    click.echo(f"notified {heard} server(s)")


_ROOT = click.option("--root", help="Registry directory or fsspec URL "
                     "(default: STREAMREC_SERVING_MODELS_ROOT).")


@click.group("models")
def models() -> None:
    """Model versions in the registry: list, publish, promote."""


@models.command("list")
@_ROOT
def list_versions(root: str | None) -> None:
    """Published versions, oldest first; the champion is marked with '*'."""
    registry, _ = _registry(root)
    current = registry.current()
    for name in registry.versions():
        click.echo(f"{'*' if name == current else ' '} {name}")


@models.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", help="Version name (default: UTC time + random suffix).")
@click.option("--promote", is_flag=True, help="Also make it the champion.")
@_ROOT
def publish(checkpoint: Path, name: str | None, promote: bool, root: str | None) -> None:
    """Copy a saved model version directory (e.g. from `streamrec train`) into the registry."""
    from model.registry import RegistryError

    registry, settings = _registry(root)
    try:
        version = registry.publish(checkpoint, name=name)
        click.echo(f"published {version} to {registry.root}")
        if promote:
            registry.promote(version)
            click.echo(f"promoted {version}")
    except RegistryError as e:
        raise click.ClickException(str(e)) from None
    if promote:
        _notify(version, settings.notify_channel)


@models.command()
@click.argument("version")
@_ROOT
def promote(version: str, root: str | None) -> None:
    """Make VERSION the champion (servers load it beside the old one and swap)."""
    from model.registry import RegistryError

    registry, settings = _registry(root)
    try:
        registry.promote(version)
    except RegistryError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"promoted {version}")
    _notify(version, settings.notify_channel)
