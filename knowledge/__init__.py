"""Wing 1: the offline CLIP knowledge that HD-OVD distils (METHOD §1.2-1.4).

CLIP never runs inside the training loop: everything the teacher says about a training image is
computed once, here, and read per image by data.py. Read in this order:

* ``clip_io.py``       loading an OpenAI-format CLIP offline (name or path), prompt-ensembled texts
* ``proposals.py``     the class-agnostic proposal network trained on base boxes (the pseudo boxes)
* ``oake.py``          CLIP box embeddings: context squares, plain crops, OADP's OAKE object token
* ``pseudo_labels.py`` caption nouns → pseudo labels, and the calibrated confidence weight
* ``extract.py``       the sharded extraction that writes one knowledge file per image
* ``official.py``      or none of the above: the released HD-OVD files, read in place
                       (``teacher.official_resources``; no CLIP, nothing extracted)

Command: ``python -m knowledge --config config.yaml [--force] [--shard i --num-shards n]``
(``train.py`` runs it when the knowledge is missing).
"""
