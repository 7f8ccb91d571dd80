"""streamrec ingest: the click-event contract, Kafka clients, and the workers that
turn the event stream into Redis session state and a Parquet archive.

This package never imports ``serving`` or ``retrain``; they may import its event
contract and archive reader.
"""
