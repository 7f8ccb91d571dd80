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
from streamrec.models_cli import models
from streamrec.run import ROLES, RunSettings
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


cli.add_command(models)


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


# --------------------------------------------------------------------------- train


def _read_config(cls: Any, path: Path | None) -> Any:
    """A model / train config from a JSON file; a bad file or key is a one-line error."""
    import json

    from model.config_base import ConfigError

    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise click.ClickException(f"{path}: {e}") from None


def _read_sequences(path: Path, workflow: Any) -> Any:
    """The encoded sessions of ``path``, refused if another workflow encoded them."""
    from features.sequences import sequences_metadata
    from model.data import Sequences

    if sequences_metadata(path)["fingerprint"] != workflow.fingerprint:
        raise click.ClickException(
            f"{path} was encoded with another workflow (fingerprint differs); pass the "
            "--workflow that wrote it"
        )
    return Sequences.from_parquet(path)


@cli.command()
@click.option("--sequences", required=True, help="Training sequences: Parquet written by "
              "features.sequences.write_sequences (e.g. by the batch path).",
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workflow", "workflow_dir", required=True, help="The fitted workflow "
              "directory that encoded the sequences; saved with the model.",
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model-config", required=True, help="JSON of model.model.ModelConfig "
              "(block, inputs, masking, next_item, ...).",
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--train-config", help="JSON of model.trainer.TrainConfig (default: its "
              "defaults); --epochs / --batch-size / --seed override it.",
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["leave-one-out", "last-item"]),
              default="leave-one-out", show_default=True,
              help="leave-one-out: SASRec protocol inside --sequences (train on all but the "
              "last 2 events, validate on the 2nd-to-last, test once on the last). "
              "last-item: train on --sequences, validate on each --valid session's last item.")
@click.option("--valid", "valid_path", help="Validation sequences for --split last-item.",
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Model version directory to write; must not exist (default: "
              "models/<UTC time>).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]),
              help="Default: cuda when available. Under torchrun each rank uses its LOCAL_RANK GPU.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override TrainConfig.epochs.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Override TrainConfig.batch_size (sessions per step and rank).")
@click.option("--seed", type=click.IntRange(min=0),
              help="Override TrainConfig.seed (weight init, shuffling, masking, dropout).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write resumable training state here after every epoch.")
@click.option("--resume", is_flag=True, help="Continue from --state-dir's last finished epoch.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(sequences: Path, workflow_dir: Path, model_config: Path, train_config: Path | None,
          split: str, valid_path: Path | None, out: Path | None, device: str | None,
          epochs: int | None, batch_size: int | None, seed: int | None,
          state_dir: Path | None, resume: bool, no_progress: bool) -> None:
    """Train a session model on encoded sequences and write a model version directory.

    The version holds the weights, the workflow, metrics.json (validation
    metrics of the selected epoch, test metrics, history, time, throughput,
    peak memory) and the run's info. Runs under torchrun too
    (`torchrun --nproc_per_node N -m streamrec train ...`): the batch size is per
    rank and only rank 0 writes and prints.
    """
    import dataclasses
    import time

    import torch
    import torch.distributed as dist

    from features.workflow import Workflow
    from model.checkpoint import save_checkpoint
    from model.config_base import ConfigError
    from model.data import item_counts, leave_one_out, next_item_split
    from model.evaluation import evaluate
    from model.model import ModelConfig, SessionModel
    from model.trainer import TrainConfig, Trainer, distributed_context, local_device

    if (split == "last-item") != (valid_path is not None):
        raise click.UsageError("--valid is needed with --split last-item, and only there")
    if resume and state_dir is None:
        raise click.UsageError("--resume needs --state-dir")
    model_cfg = _read_config(ModelConfig, model_config)
    overrides = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size),
                                   ("seed", seed)) if v is not None}
    if no_progress:
        overrides["progress"] = False
    try:
        cfg = dataclasses.replace(_read_config(TrainConfig, train_config), **overrides)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    target = out or Path("models") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if target.exists():
        raise click.ClickException(f"{target} exists: versions are immutable, pick a new --out")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device here; use --device cpu")
    dev = local_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank, world = distributed_context(dev)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        workflow = Workflow.load(workflow_dir)
        item = workflow.schema.item_id_feature.name
        data = _read_sequences(sequences, workflow)
        if valid_path is None:
            loo = leave_one_out(data, item)
            train_data, valid, test = loo.train, loo.valid, loo.test
        else:
            train_data, test = data, None
            valid = next_item_split(_read_sequences(valid_path, workflow), item)
        if len(valid[1]) == 0:
            raise click.ClickException("no validation query: every session is too short")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        counts = item_counts(train_data, workflow.cardinalities[item], item)
        try:
            model = SessionModel(workflow.schema, model_cfg, item_counts=counts)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        trainer = Trainer(model, cfg, train_data, valid, device=dev, state_dir=state_dir)
        try:
            result = trainer.fit(resume=resume)
        except FloatingPointError as e:  # diverged: the message says what to change
            raise click.ClickException(str(e)) from None
        test_metrics = None
        if test is not None:  # once, on the validation-selected weights
            test_metrics = evaluate(
                model, *test, batch_size=cfg.eval_batch_size, ks=cfg.ks,
                exclude_seen=cfg.exclude_seen, sampled_negatives=cfg.sampled_negatives,
                device=dev, rank=rank, world_size=world, seed=cfg.seed)
        if rank == 0:
            metrics = {"select_metric": cfg.select_metric, "valid": result.best_valid,
                       "test": test_metrics, **dataclasses.asdict(result)}
            del metrics["best_valid"]  # it is "valid"
            info = {"sequences": str(sequences), "valid_sequences": valid_path and str(valid_path),
                    "split": split, "world_size": world, "seed": cfg.seed,
                    "train_sessions": len(train_data), "train_config": dataclasses.asdict(cfg)}
            path = save_checkpoint(target, model, workflow, metrics, info)
            _echo_summary(result.best_epoch, result.best_valid, test_metrics, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _echo_summary(best_epoch: int, valid: dict[str, float], test: dict[str, float] | None,
                  path: Path) -> None:
    def fmt(m: dict[str, float] | None) -> str:
        if not m:
            return "-"
        return "  ".join(f"{k}={m[k]:.4f}" for k in ("ndcg@10", "hr@10") if k in m)

    click.echo(f"best epoch {best_epoch}")
    click.echo(f"valid  {fmt(valid)}")
    click.echo(f"test   {fmt(test)}")
    click.echo(f"saved  {path}")


# --------------------------------------------------------------------------- serve


@cli.command()
@click.option("--host", help="Address to listen on (STREAMREC_SERVING_HOST).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (STREAMREC_SERVING_PORT).")
@click.option("--models-root", help="Model registry directory or fsspec URL "
              "(STREAMREC_SERVING_MODELS_ROOT).")
def serve(host: str | None, port: int | None, models_root: str | None) -> None:
    """Run the recommendation service (HTTP API; docs/serving.md).

    POST /v1/recommendations answers from the Redis sessions and the model
    version named by the registry's CURRENT pointer (hot-swapped when it moves);
    popularity answers when it cannot. Also POST /v1/events, GET /healthz,
    /readyz, /metrics, /docs, and /admin/* with STREAMREC_SERVING_ADMIN_TOKEN.
    """
    import uvicorn

    from serving.app import build_app
    from serving.settings import ServingSettings

    overrides = {k: v for k, v in (("host", host), ("port", port),
                                   ("models_root", models_root)) if v is not None}
    settings = load(ServingSettings, **overrides)
    kafka, redis_ = connections()
    app = build_app(settings, kafka, _require_redis(redis_), load(IngestSettings))
    if not kafka.bootstrap:
        click.echo("no Kafka configured: POST /v1/events answers 503", err=True)
    click.echo(f"serving on http://{settings.host}:{settings.port} (models: "
               f"{settings.models_root})", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


# --------------------------------------------------------------------------- monitor


@cli.command()
@click.option("--metrics-port", type=click.IntRange(0, 65535),
              help="Prometheus port (STREAMREC_MONITOR_METRICS_PORT; 0 = any free port).")
@click.option("--models-root", help="Model registry directory or fsspec URL "
              "(STREAMREC_SERVING_MODELS_ROOT; the server's).")
def monitor(metrics_port: int | None, models_root: str | None) -> None:
    """Watch live clicks for drift and publish alarms (docs/drift.md).

    Scores each click against what the server recommended to its session just
    before (online HR@k / NDCG@k per model version), compares the clicked items
    and session lengths with the champion's training window (PSI, Jensen-Shannon,
    OOV rate, KS), runs a Page-Hinkley test on the hit rate, exports it all on
    /metrics and publishes an alarm on the Redis channel
    STREAMREC_MONITOR_ALARM_CHANNEL when a detector fires. Reacting (retraining)
    is the scheduler's job.
    """
    from serving.monitor import monitor_worker
    from serving.monitor_settings import MonitorSettings
    from serving.settings import ServingSettings

    overrides = {"metrics_port": metrics_port} if metrics_port is not None else {}
    settings = load(MonitorSettings, **overrides)
    root = models_root or load(ServingSettings).models_root
    kafka, redis_ = connections()
    worker, metrics = monitor_worker(_require_kafka(kafka), _require_redis(redis_), settings, root)
    _run_worker(worker, metrics, settings.metrics_port, "drift monitor")


# --------------------------------------------------------------------------- retrain


@cli.command()
@click.option("--once", is_flag=True,
              help="Run one retrain now and exit (what the Kubernetes CronJob runs).")
@click.option("--schedule", "cron", is_flag=False, flag_value="", default=None, metavar="CRON",
              help="Keep running: retrain on this cron expression (UTC; alone, "
              "STREAMREC_RETRAIN_SCHEDULE) and on drift alarms from Redis.")
def retrain(once: bool, cron: str | None) -> None:
    """Fine-tune the champion on the latest archive window; promote it if not worse.

    Reads the last STREAMREC_RETRAIN_WINDOW_HOURS of the archive, extends the
    vocabularies, grows and fine-tunes a copy of the champion (with a replay
    sample of older sessions), judges both on the most recent held-out slice and
    moves the registry's CURRENT pointer only if the challenger is not worse by
    more than STREAMREC_RETRAIN_MARGIN; servers are told over Redis. A failed or
    interrupted run leaves the champion as it was. Never two runs at once (a
    file or Redis lock). Exit status: 0 promoted / rejected / skipped, 1 failed.
    See docs/retrain.md.
    """
    from ingest.redis_conn import make_redis
    from retrain.schedule import once as retrain_once
    from retrain.schedule import serve as retrain_serve
    from retrain.settings import RetrainSettings

    if once == (cron is not None):
        raise click.UsageError("give either --once or --schedule [CRON]")
    settings = load(RetrainSettings, **({"schedule": cron} if cron else {}))
    _, redis_ = connections()
    client = make_redis(redis_) if redis_.url else None
    if client is None:
        click.echo("no Redis configured: servers see a promotion at their next poll, "
                   "no drift alarms are heard", err=True)
    if not once:
        with stop_on_signal() as stop:
            retrain_serve(settings, settings.schedule, stop, client)
        return
    summary = retrain_once(settings, client)
    if summary is None:
        click.echo("another retrain run holds the lock; nothing done")
        return
    line = f"{summary.outcome} ({summary.reason})"
    if summary.decision:
        d = summary.decision
        line += (f": challenger {d['metric']}={d['challenger']:.4f}, "
                 f"champion {d['champion']:.4f} ({summary.champion})")
    if summary.version and summary.outcome == "promoted":
        line += f"; new champion {summary.version}"
    click.echo(line)
    if summary.outcome == "failed":
        raise click.ClickException(summary.error or "retrain failed")


# --------------------------------------------------------------------------- run


@cli.command("run")
@click.option("--role", "roles", multiple=True, type=click.Choice(list(ROLES)),
              help="Run only this role (repeatable; default STREAMREC_RUN_ROLES, all roles).")
@click.option("--no-restart", is_flag=True,
              help="A child that exits stops everything (exit status 1) instead of a restart.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Each role's output in <dir>/<role>.log instead of prefixed on stdout.")
def run_services(roles: tuple[str, ...], no_restart: bool, log_dir: Path | None) -> None:
    """Run the long-running services on this host, one process per role.

    Roles: sessions (ingest sessions), archive (ingest archive), serve, monitor,
    retrain (retrain --schedule); each reads the same settings (environment and
    --config file) and serves its own metrics port. Ctrl-C / SIGTERM stops them
    in order (API first, ingest last), each given STREAMREC_RUN_GRACE_S to drain;
    a child that exits is restarted with back-off. On Kubernetes or Compose run
    one role per container instead (deploy/README.md).
    """
    from streamrec.run import Supervisor

    overrides: dict[str, Any] = {}
    if roles:
        overrides["roles"] = list(roles)
    if no_restart:
        overrides["restart"] = False
    if log_dir is not None:
        overrides["log_dir"] = log_dir
    settings = load(RunSettings, **overrides)
    kafka, redis_ = connections()
    needs = {"sessions": kafka.bootstrap and redis_.url, "archive": kafka.bootstrap,
             "monitor": kafka.bootstrap and redis_.url, "serve": redis_.url}
    missing = [r for r in settings.roles if r in needs and not needs[r]]
    if missing:
        raise click.UsageError(
            f"role(s) {', '.join(missing)} need Kafka and/or Redis: start the local stack "
            "(`streamrec up`) or set STREAMREC_KAFKA_BOOTSTRAP / STREAMREC_REDIS_URL")
    env = dict(os.environ)
    env.update({k: v for k, v in (("STREAMREC_KAFKA_BOOTSTRAP", kafka.bootstrap),
                                  ("STREAMREC_REDIS_URL", redis_.url)) if v})
    click.echo(f"running {', '.join(settings.roles)} (Ctrl-C stops them)", err=True)
    with stop_on_signal() as stop:
        status = Supervisor(settings, env=env).run(stop)
    if status:
        raise click.ClickException("a service exited; see its output above")


# --------------------------------------------------------------------------- demo


@cli.command()
@click.option("--history-hours", type=click.FloatRange(min=0.25), default=2.0, show_default=True,
              help="Simulated history produced first; the first model is trained on it.")
@click.option("--live-seconds", type=click.FloatRange(min=0), default=240.0, show_default=True,
              help="Then this long of live, paced clicks with recommendations asked for.")
@click.option("--drift-after", type=click.FloatRange(min=0), default=80.0, show_default=True,
              help="Seconds into the live phase when the simulated world changes.")
@click.option("--speedup", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Event-time speed of the live phase relative to the wall clock.")
@click.option("--sessions-per-hour", type=click.FloatRange(min=10), default=600.0,
              show_default=True, help="Simulated session arrivals per event-time hour.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="API and demo page port (a free one if taken; 0 = any).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".streamrec/demo"), show_default=True,
              help="Where the archive, models, logs and the plot go (emptied first).")
@click.option("--linger/--no-linger", default=None,
              help="Keep the services up after the live phase until Ctrl-C "
              "(default: when stdout is a terminal).")
@click.option("--seed", type=int, default=7, show_default=True)
def demo(history_hours: float, live_seconds: float, drift_after: float, speedup: float,
         sessions_per_hour: float, port: int, out: Path, linger: bool | None, seed: int) -> None:
    """Run the whole loop on the embedded stack and narrate it.

    Starts a real Valkey and Kafka-compatible broker, the services (as
    `streamrec run`), streams a simulated history, bootstraps a first model,
    streams live clicks while asking for recommendations, drifts the world
    half-way, retrains on schedule and on drift alarms, and reports online
    HR@10 before and after the drift and after retraining, with a PNG plot.
    The demo page is at http://127.0.0.1:PORT/ meanwhile. Ctrl-C stops it all.
    """
    from streamrec.demo import DemoConfig, run_demo

    run_demo(DemoConfig(
        history_hours=history_hours, live_seconds=live_seconds, drift_after_s=drift_after,
        speedup=speedup, sessions_per_hour=sessions_per_hour, port=port, out=out, seed=seed,
        linger=sys.stdout.isatty() if linger is None else linger))


if __name__ == "__main__":
    main()
