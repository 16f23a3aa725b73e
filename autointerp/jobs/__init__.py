"""The one work loop every command that does per-feature work runs on, and what it needs of a stage.

- `stage`: the `Stage` interface (the extension point for a new kind of work), `Tally`, `Identity`, `ChunkResult`
  and the registry `STAGES` (the only place a stage's name is looked up).
- `loop`: `Job`, the loop itself: units and leases in the store, budgets, progress, one `Run` row per part.
- `executors`: where claimed chunks run (this process, or a process pool), with chunks as plain data.
- `budget`, `progress`, `clients`: caps and exit codes, progress lines, LLM clients wired to the store.
"""

from autointerp.jobs.budget import Budget, BudgetError, Spend
from autointerp.jobs.clients import make_client
from autointerp.jobs.progress import LogLines, Progress
from autointerp.jobs.stage import STAGES, ChunkResult, Identity, Stage, Tally

__all__ = [
    "STAGES",
    "Budget",
    "BudgetError",
    "ChunkResult",
    "Identity",
    "LogLines",
    "Progress",
    "Spend",
    "Stage",
    "Tally",
    "make_client",
]
