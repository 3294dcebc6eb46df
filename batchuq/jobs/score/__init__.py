"""The score job: discover -> decode/augment -> sample -> summarise -> decide -> write.

One package, a module per step:

* ``plan``: resolve what the caller gave into one frozen ``RunPlan``;
* ``batches``: decode, augment and sample the images, a batch at a time;
* ``rows``: turn a sampled batch into Parquet columns, and the run's schema and report;
* ``local``: the local engine and ``score_directory``, the entry point;
* ``ray_engine``, ``ray_worker``, ``ray_session``: the same rows on a Ray cluster.
"""

from batchuq.jobs.score.local import score_directory
from batchuq.jobs.score.rows import ScoreReport

__all__ = ["ScoreReport", "score_directory"]
