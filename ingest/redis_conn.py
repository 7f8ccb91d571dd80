"""One way to build a Redis client from :class:`RedisSettings` (TLS, cluster)."""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from ingest.settings import RedisSettings


class RedisNotConfigured(RuntimeError):
    """No Redis URL was given and no local stack is running."""


def make_redis(settings: RedisSettings, **overrides: Any) -> redis.Redis | RedisCluster:
    """A client for ``settings.url``; ``RedisCluster`` when ``settings.cluster``.

    Timeouts and TLS files come from the settings; ``overrides`` go to the
    client as keyword arguments.
    """
    if not settings.url:
        raise RedisNotConfigured(
            "no Redis: set STREAMREC_REDIS_URL=redis://host:port/0, "
            "or start the local stack with `streamrec up`"
        )
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "retry_on_timeout": True,
    }
    if settings.url.startswith("rediss://"):
        for ours, theirs in (
            ("ssl_ca_certs", "ssl_ca_certs"),
            ("ssl_certfile", "ssl_certfile"),
            ("ssl_keyfile", "ssl_keyfile"),
        ):
            if getattr(settings, ours):
                kwargs[theirs] = getattr(settings, ours)
    kwargs.update(overrides)
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **kwargs)
    return redis.Redis.from_url(settings.url, **kwargs)
