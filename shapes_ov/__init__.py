"""Wing 2: Shapes-OV, the embedded open-vocabulary world (spec: shapes_ov/README.md).

It exists only because COCO and OpenAI's CLIP weights cannot be downloaded here: a pocket-sized
OV-COCO in COCO layout (12 base / 4 novel shapes, captions) and a small CLIP teacher pre-trained
on it, so the same code path as OV-COCO runs end to end on two CPU cores. Read in this order:

* ``shapes.py``         drawing the 16 shapes, cluttered scenes and their captions
* ``shapes_ov/world.py``          writing the dataset in COCO layout, and the build steps
* ``clip_pretrain.py``  pre-training the small CLIP teacher and its zero-shot check

Command: ``python -m shapes_ov --config config.yaml [--force]`` (``train.py`` runs it when the
world is missing).
"""
