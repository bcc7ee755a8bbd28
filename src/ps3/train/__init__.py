"""PS3 pre-training (design §5), open_clip style, one concern per module:

* :mod:`ps3.train.loader` — paired image / text-box webdatasets → batches, bad samples skipped and counted;
* :mod:`ps3.train.synthetic` — scenes of captioned objects for tests, the demo and the benchmark;
* :mod:`ps3.train.model_setup` — named training configs, initialisation, the training forward;
* :mod:`ps3.train.loss` — SigLIP loss across ranks and box supervision of the selection;
* :mod:`ps3.train.params` — :class:`TrainParams` (what a run is asked to do), the ``ps3 train`` flags, their checks;
* :mod:`ps3.train.distributed` — process groups under ``torchrun``, rank-0 helpers, DDP/FSDP wrapping;
* :mod:`ps3.train.checkpoint` — checkpoint files (atomic writes, listing, latest), RNG state, the run directory;
* :mod:`ps3.train.optim` — AdamW parameter groups from the model's settings, gradient clipping, the schedule;
* :mod:`ps3.train.loop` — the thin loop (``python -m ps3.train``, :func:`~ps3.train.loop.train`): build, step,
  report, save;
* :mod:`ps3.train.export` and :mod:`ps3.train.evaluate` — the published layout, learnability.

Submodules are imported explicitly so that ``import ps3`` does not need the training extras
(``webdataset``).
"""
