"""The score job: discover -> decode/augment -> sample -> summarise -> decide -> write.

One package, a module per step:

* ``options``: what a run is asked (``ScoreOptions``, ``RunControl``, ``RaySettings``);
* ``plan``: resolve what the caller gave into one frozen ``RunPlan``;
* ``batches``: decode, augment and sample the images, a batch at a time;
* ``rows``: turn a sampled batch into Parquet columns, and the run's schema and report;
* ``job``: ``score_directory``, the entry point, which hands the run to an engine;
* ``local``: the local engine, in this process;
* ``ray_engine``, ``ray_worker``, ``ray_session``: the same rows on a Ray cluster.
"""

from batchuq.jobs.score.job import score_directory
from batchuq.jobs.score.options import RaySettings, RunControl, ScoreOptions
from batchuq.jobs.score.rows import ScoreReport

__all__ = ["RaySettings", "RunControl", "ScoreOptions", "ScoreReport", "score_directory"]
