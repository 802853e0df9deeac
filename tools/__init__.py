"""One-off tools, run once per dataset or checkpoint, never during training:

* ``python -m tools.ov_coco --coco-root dataset/coco``: the OV-COCO 48/17 annotation files.
* ``python -m tools.convert_adamixer``: official AdaMixer checkpoints into this project's layout.
* ``python tools/import_graph.py``: the project's import graph (modules, edges, depth) and its layer rule.
"""
