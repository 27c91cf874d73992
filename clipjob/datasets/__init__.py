"""Dataset authoring: inputs -> webdataset shards + manifest.json (`clipjob data build`, `clipjob data emoji`)
and checking shards (`clipjob data inspect`). Imports the read path (clipjob.data) where it needs it; the read
path never imports this package.

- writer.py: ShardWriter (deterministic tar shards, manifest.json last)
- build.py: folders, CSV/TSV/parquet tables, CoreNet tars -> shards, parallel and resumable
- corenet_tar.py: CoreNet's image-text tar dataset, read with a restricted unpickler
- emoji.py: the embedded emoji dataset (Twemoji pictures, held-out concepts for zero-shot)
- inspect.py: counts, bad samples by reason, caption and image statistics of a shard spec
"""
