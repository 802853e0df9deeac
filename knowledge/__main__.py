"""``python -m knowledge --config config.yaml``: extract the offline CLIP knowledge (extract.py)."""
from knowledge.extract import main

main()
