"""clipjob: train CLIP models at scale, evaluate zero-shot classification, run it all as Kubernetes batch jobs."""

__version__ = "0.1.0"
