"""PS3 pre-training: data pipeline (:mod:`ps3.train.data`), synthetic data
(:mod:`ps3.train.synthetic`) and losses (:mod:`ps3.train.loss`).

Submodules are imported explicitly so that ``import ps3`` does not need the training extras
(``webdataset``).
"""
