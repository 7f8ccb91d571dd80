"""The ``streamrec`` command line.

Every command has ``--help``. Settings come from ``STREAMREC_*`` env vars and an
optional TOML file (``--config`` / ``STREAMREC_CONFIG``); see docs/settings.md.
When no Kafka / Redis is configured, commands that need them use the stack
started by ``streamrec up`` (found through its state file).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec

from ingest.kafka import KafkaClientError, ensure_topics, make_producer
from ingest.settings import IngestSettings, KafkaSettings, RedisSettings
from streamrec import __version__
from streamrec.settings import (
    SECTIONS,
    LogSettings,
    SettingsError,
    StackSettings,
    apply_config_file,
    check_environment,
    load,
    settings_markdown,
)
from streamrec.signals import stop_on_signal
from streamrec.stack import LocalStack, StackError, running_servers, stop_detached

log = logging.getLogger("streamrec")


def _setup_logging(settings: LogSettings) -> None:
    if settings.json_format:
        fmt = '{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}'
    else:
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    logging.basicConfig(level=settings.level, format=fmt, stream=sys.stderr, force=True)
    # Client libraries narrate every connection at INFO; keep their warnings.
    for noisy in ("kafka", "ingest.kafka.librdkafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.level)))


class _Group(click.Group):
    """Turns the errors a user can cause into one clear line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (SettingsError, StackError, KafkaClientError) as e:
            raise click.ClickException(str(e)) from e
        except ValueError as e:
            if type(e) is ValueError:  # config validation in the components
                raise click.ClickException(str(e)) from e
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="STREAMREC_CONFIG",
    help="TOML settings file; environment variables override it.",
)
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR (STREAMREC_LOG_LEVEL).")
@click.version_option(__version__, prog_name="streamrec")
def cli(config_file: Path | None, log_level: str | None) -> None:
    """streamrec: a streaming, online-learning, session-based recommender."""
    if config_file is not None:
        apply_config_file(config_file)
    if log_level:
        os.environ["STREAMREC_LOG_LEVEL"] = log_level
    check_environment()
    _setup_logging(load(LogSettings))


def main() -> None:
    cli(prog_name="streamrec")


# --------------------------------------------------------------------------- connections


def connections() -> tuple[KafkaSettings, RedisSettings]:
    """Kafka and Redis settings, filled from a running ``streamrec up`` if unset."""
    kafka, redis_ = load(KafkaSettings), load(RedisSettings)
    if kafka.bootstrap and redis_.url:
        return kafka, redis_
    stack = load(StackSettings)
    servers = running_servers(stack.state_dir)
    if not kafka.bootstrap and "kafka" in servers:
        kafka = kafka.model_copy(update={"bootstrap": f"127.0.0.1:{servers['kafka']['port']}"})
    if not redis_.url and "redis" in servers:
        redis_ = redis_.model_copy(update={"url": f"redis://127.0.0.1:{servers['redis']['port']}/0"})
    return kafka, redis_


def _require_kafka(kafka: KafkaSettings) -> KafkaSettings:
    if not kafka.bootstrap:
        raise click.ClickException(
            "no Kafka to talk to: run `streamrec up` first, or set STREAMREC_KAFKA_BOOTSTRAP"
        )
    return kafka


# --------------------------------------------------------------------------- up / down / status


@cli.command()
@click.option(
    "--foreground",
    is_flag=True,
    help="Keep running until Ctrl-C and stop the servers then (default: start and return).",
)
def up(foreground: bool) -> None:
    """Start the local stack: a Redis-compatible server and a Kafka-compatible broker.

    Servers already given by STREAMREC_REDIS_URL / STREAMREC_KAFKA_BOOTSTRAP are
    not started. Prints the env vars that point other tools at the stack.
    """
    settings = load(StackSettings)
    if running := running_servers(settings.state_dir):
        click.echo(f"already running: {', '.join(sorted(running))} (see `streamrec status`)")
        return
    kafka, redis_ = load(KafkaSettings), load(RedisSettings)
    stack = LocalStack(settings, kafka, redis_, tie_to_parent=foreground).start()
    for name, server in (("redis", stack.redis_server), ("kafka", stack.kafka_server)):
        if server is not None:
            click.echo(f"{name:6s} pid {server.pid:<7d} 127.0.0.1:{server.port}  log {server.log_path}")
        else:
            click.echo(f"{name:6s} external")
    for k, v in stack.env().items():
        click.echo(f"export {k}={v}")
    if not foreground:
        stack.write_state()
        click.echo("stop with: streamrec down")
        return
    with stop_on_signal() as stop:
        click.echo("running; Ctrl-C to stop")
        stop.wait()
    stack.stop()
    click.echo("stopped")


@cli.command()
def down() -> None:
    """Stop the servers started by `streamrec up`."""
    settings = load(StackSettings)
    stopped = stop_detached(settings.state_dir)
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@cli.command()
def status() -> None:
    """Show where Kafka and Redis are and whether they answer."""
    from ingest.redis_conn import make_redis

    kafka, redis_ = connections()
    ok = True
    try:
        client = make_redis(redis_)
        client.ping()
        client.close()
        click.echo(f"redis  {redis_.url}  ok")
    except Exception as e:
        ok = False
        click.echo(f"redis  {redis_.url or '-'}  DOWN: {e}")
    try:
        from ingest.kafka import make_admin

        admin = make_admin(_require_kafka(kafka).model_copy(update={"request_timeout_ms": 3000}))
        topics = sorted(t for t in admin.list_topics() if not t.startswith("__"))
        admin.close()
        click.echo(f"kafka  {kafka.bootstrap}  ok  topics: {', '.join(topics) or '-'}")
    except Exception as e:
        ok = False
        click.echo(f"kafka  {kafka.bootstrap or '-'}  DOWN: {e}")
    if not ok:
        raise SystemExit(1)


@cli.command("config")
@click.option("--section", type=click.Choice(sorted(SECTIONS)), help="Only this section.")
@click.option("--markdown", is_flag=True, help="Print the reference of every setting instead.")
def show_config(section: str | None, markdown: bool) -> None:
    """Print the effective settings (env > config file > defaults) as TOML."""
    if markdown:
        click.echo(settings_markdown(), nl=False)
        return
    for name, cls in SECTIONS.items():
        if section and name != section:
            continue
        click.echo(f"[{name}]")
        for key, value in load(cls).model_dump(mode="json").items():
            if value is None:
                click.echo(f"# {key} = (unset)")
                continue
            if "password" in key:
                value = "**********"
            click.echo(f"{key} = {_toml_value(value)}")
        click.echo()


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return msgspec.json.encode(v).decode()


# --------------------------------------------------------------------------- data commands


def _produce_stream(
    events: Any,
    kafka: KafkaSettings,
    speedup: float | None,
    live_timestamps: bool,
    stop: threading.Event | None = None,
) -> int:
    from ingest.replay import send_events

    ensure_topics(kafka)
    producer = make_producer(kafka)
    if stop is not None:
        events = _until(events, stop.is_set)
    try:
        return send_events(
            events, producer, kafka.events_topic, speedup=speedup, live_timestamps=live_timestamps
        )
    finally:
        producer.close()


def _until(events: Any, stopped: Callable[[], bool]) -> Any:
    for ev in events:
        if stopped():
            return
        yield ev


_speedup = click.option(
    "--speedup",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Pace by event time, this many times faster than real time (default: as fast as possible).",
)
_live = click.option(
    "--live-timestamps",
    is_flag=True,
    help="Stamp each event with the wall-clock time it is sent (for live demos).",
)
_out = click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a Parquet file instead of producing to Kafka.",
)


@cli.command()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hours", type=float, default=24.0, show_default=True, help="Event-time span.")
@click.option("--events", "n_events", type=int, help="Stop after this many events.")
@click.option("--items", "n_items", type=int, default=2000, show_default=True)
@click.option("--topics", "n_topics", type=int, default=20, show_default=True)
@click.option("--sessions-per-hour", type=float, default=2000.0, show_default=True)
@click.option("--zipf", type=float, default=1.1, show_default=True, help="Popularity exponent.")
@click.option(
    "--drift", type=click.Choice(["none", "abrupt", "gradual"]), default="none", show_default=True
)
@click.option("--drift-at", type=float, default=12.0, show_default=True, help="Hours from start.")
@click.option("--drift-width", type=float, default=4.0, show_default=True, help="Hours (gradual).")
@click.option("--new-items-per-hour", type=float, default=0.0, show_default=True)
@_speedup
@_live
@_out
def simulate(
    seed: int,
    hours: float,
    n_events: int | None,
    n_items: int,
    n_topics: int,
    sessions_per_hour: float,
    zipf: float,
    drift: str,
    drift_at: float,
    drift_width: float,
    new_items_per_hour: float,
    speedup: float | None,
    live_timestamps: bool,
    out: Path | None,
) -> None:
    """Generate a synthetic click stream with known structure and optional drift.

    Items live in topics with Zipf popularity and Markov-like in-session
    transitions; side features category and price. Deterministic under --seed.
    Writes to the events topic (default) or, with --out, to Parquet.
    """
    from ingest.replay import write_parquet
    from ingest.simulator import Simulator, SimulatorConfig

    config = SimulatorConfig(
        seed=seed, duration_hours=hours, n_events=n_events, n_items=n_items, n_topics=n_topics,
        sessions_per_hour=sessions_per_hour, zipf_exponent=zipf, drift=drift, drift_at=drift_at,
        drift_width=drift_width, new_items_per_hour=new_items_per_hour,
    )
    sim = Simulator(config)
    if out is not None:
        n = write_parquet(sim.record_batches(), out)
        click.echo(f"wrote {n} events to {out}")
        return
    kafka, _ = connections()
    with stop_on_signal() as stop:
        n = _produce_stream(sim.events(), _require_kafka(kafka), speedup, live_timestamps, stop)
    click.echo(f"produced {n} events to {kafka.events_topic} at {kafka.bootstrap}")


@cli.command()
@click.argument("dataset", type=click.Choice(["ml-100k", "yoochoose"]))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="STREAMREC_DATA_DIR",
    help="Folder with the datasets (default: ../shared/data beside the repo).",
)
@click.option("--limit", type=int, help="Only the first N events in event-time order.")
@_speedup
@_live
@_out
def replay(
    dataset: str,
    data_dir: Path | None,
    limit: int | None,
    speedup: float | None,
    live_timestamps: bool,
    out: Path | None,
) -> None:
    """Send a real timestamped click log to Kafka in event-time order.

    ml-100k: MovieLens-100k ratings (user = session), with rating, category
    and year. yoochoose: the YOOCHOOSE click sample (train_full split).
    """
    from ingest.replay import default_data_dir, read_movielens_100k, read_yoochoose, write_parquet

    root = data_dir or default_data_dir()
    if dataset == "ml-100k":
        events = read_movielens_100k(root / "ml-100k", limit=limit)
    else:
        events = read_yoochoose(
            root / "yoochoose-100k" / "yoochoose-clicks-100k_train_full.txt", limit=limit
        )
    if out is not None:
        n = write_parquet(events, out)
        click.echo(f"wrote {n} events to {out}")
        return
    kafka, _ = connections()
    with stop_on_signal() as stop:
        n = _produce_stream(events, _require_kafka(kafka), speedup, live_timestamps, stop)
    click.echo(f"produced {n} events to {kafka.events_topic} at {kafka.bootstrap}")


# --------------------------------------------------------------------------- ingest


@cli.group("ingest")
def ingest_group() -> None:
    """Ingest workers: one process per role; run more processes to scale out.

    Each is a consumer-group member: N processes share the topic's partitions.
    """


def _require_redis(redis_: RedisSettings) -> RedisSettings:
    if not redis_.url:
        raise click.ClickException(
            "no Redis to talk to: run `streamrec up` first, or set STREAMREC_REDIS_URL"
        )
    return redis_


def _run_worker(worker: Any, metrics: Any, port: int, what: str) -> None:
    from ingest.metrics import serve

    server, _ = serve(metrics.registry, port)
    click.echo(f"{what}: metrics on http://127.0.0.1:{server.server_port}/metrics", err=True)
    old = {s: signal.signal(s, lambda *_: worker.stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.run()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        server.shutdown()


@ingest_group.command("sessions")
def ingest_sessions() -> None:
    """Apply click events to the Redis session store; rejects go to the DLQ.

    Idempotent: offsets are committed only after the Redis writes and the
    dead-letter records they cover are durable. SIGTERM finishes the batch in
    hand, commits and exits.
    """
    from ingest.app import sessions_worker

    kafka, redis_ = connections()
    s = load(IngestSettings)
    worker, metrics = sessions_worker(_require_kafka(kafka), _require_redis(redis_), s)
    _run_worker(worker, metrics, s.sessions_metrics_port, "session updater")


@ingest_group.command("archive")
def ingest_archive() -> None:
    """Write every valid event to Parquet, partitioned by event hour.

    Files are written under a temporary name and renamed; offsets are
    committed after the rename. Readers deduplicate by event_id.
    """
    from ingest.app import archive_worker

    kafka, _ = connections()
    s = load(IngestSettings)
    worker, metrics = archive_worker(_require_kafka(kafka), s)
    _run_worker(worker, metrics, s.archive_metrics_port, "archiver")


# --------------------------------------------------------------------------- demo


@cli.command()
@click.option("--history-events", type=int, default=50_000, show_default=True,
              help="Simulated history produced as fast as possible first.")
@click.option("--live-seconds", type=float, default=20.0, show_default=True,
              help="Then this long of live, paced clicks (0 = skip).")
@click.option("--speedup", type=float, default=60.0, show_default=True,
              help="Event-time speed of the live phase relative to the wall clock.")
@click.option("--seed", type=int, default=7, show_default=True)
def demo(history_events: int, live_seconds: float, speedup: float, seed: int) -> None:
    """Run the pipeline on the embedded stack and narrate what happens."""
    from streamrec.demo import run_demo

    run_demo(
        history_events=history_events, live_seconds=live_seconds, speedup=speedup, seed=seed
    )


if __name__ == "__main__":
    main()
