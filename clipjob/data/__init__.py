"""The training read path: shard specs -> samples -> augmented, tokenised batches (also eval's shard reader).

- shards.py: source syntax, URL expansion, reading one tar shard with bad-shard accounting, seeds
- tarstream.py: streaming tar member reader; decode.py: one sample -> image + caption, or why it is bad
- transforms.py: train/eval transforms; multiscale.py: per-step (resolution, batch) schedule
- pipeline.py: the per-rank DataLoader (resampled shards, seeded shuffle buffer, batches in workers)
- manifest.py: manifest.json (format, validation, sample counts); the writer lives in clipjob.datasets

Nothing here imports clipjob.datasets (dataset authoring).
"""
