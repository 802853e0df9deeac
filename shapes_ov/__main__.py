"""``python -m shapes_ov --config config.yaml``: build Shapes-OV and its CLIP teacher (shapes_ov/world.py)."""
import os

# Under CPU contention (shared CI machines, several jobs on 2 cores) spinning OpenMP threads made
# a teacher step 5-17x slower (LOG.md, 2026-11-25); this must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from shapes_ov.world import main  # noqa: E402  (imports torch)

main()
