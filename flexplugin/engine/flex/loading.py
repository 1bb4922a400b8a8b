"""How flex-train reads its particles, declared once and torch-free: the default number of DataLoader workers
(`flex-train --workers`) and the environment variable naming a scratch folder for the prepared-particles cache
(`--scratch`, engine/flex/cache.py). The CLI, the trainer and the Scipion training protocol read them here
(docs/distributed.md, "Data at scale")."""
from __future__ import annotations

__all__ = ["LOADER_WORKERS", "SCRATCH_ENV"]

# DataLoader processes that read and prepare the next batches while the current one trains; 0: the batches are
# prepared in the training process, one at a time. Not a training setting: results do not depend on it.
LOADER_WORKERS = 0
# the scratch folder of the prepared-particles cache when `--scratch` is not given (unset or empty: no cache)
SCRATCH_ENV = "FLEXPLUGIN_SCRATCH"
