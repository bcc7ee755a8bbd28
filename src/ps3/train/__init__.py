"""PS3 pre-training (SPEC §5), open_clip style, one concern per module:

* :mod:`ps3.train.data` — paired image / text-box webdatasets → batches, bad samples skipped and counted;
* :mod:`ps3.train.synthetic` — scenes of captioned objects for tests, the demo and the benchmark;
* :mod:`ps3.train.model` — named training configs, initialisation, the training forward;
* :mod:`ps3.train.loss` — SigLIP loss across ranks and box supervision of the selection;
* :mod:`ps3.train.loop` — the thin training script (``python -m ps3.train``), checkpoints, resume;
* :mod:`ps3.train.export` and :mod:`ps3.train.evaluate` — the published layout, learnability.

Submodules are imported explicitly so that ``import ps3`` does not need the training extras
(``webdataset``).
"""
