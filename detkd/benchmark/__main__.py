"""``python -m detkd.benchmark``: ``run-one JOB.json`` is the child process of one run (started by
:func:`~detkd.benchmark.jobs.run_in_child`); anything else is ``detkd benchmark``."""

import json
import sys
from pathlib import Path

if sys.argv[1:2] == ["run-one"]:
    from detkd.benchmark.jobs import Job, run_job

    run_job(Job(**json.loads(Path(sys.argv[2]).read_text())))
    sys.exit(0)

from detkd.benchmark.runner import main

sys.exit(main())
