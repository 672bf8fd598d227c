from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.jobs.schemas import JobCatalogueOut, JobRunPage, RunListArgs
from courier_api.api.pagination import keyset_page
from courier_api.extensions import db
from courier_api.scheduler import JOB_SPECS
from models import Role, utcnow
from sync import scheduling

blp = ApiBlueprint(
    "jobs", __name__, url_prefix="/api/v1/jobs", description="Scheduled jobs and their runs"
)


@blp.route("")
class Jobs(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.ADMIN)
    @blp.response(200, JobCatalogueOut)
    def get(self) -> dict[str, Any]:
        """List the scheduled jobs

        Every job the scheduler runs: what it does, how often (`interval_seconds`),
        and its latest run (`null` if it never ran), whether still `running`, `ok`
        (with `detail`: what it did) or `failed` (with the `error`). `lease` names
        the scheduler process that runs jobs now and until when it holds the lease;
        `null` when no scheduler is running (start one with `courier-api
        scheduler`). Admins only.
        """
        last = scheduling.latest_runs(db.session, list(JOB_SPECS))
        return {
            "jobs": [
                {
                    "name": spec.name,
                    "description": spec.description,
                    "interval_seconds": spec.interval_seconds,
                    "last_run": last[spec.name],
                }
                for spec in JOB_SPECS.values()
            ],
            "lease": scheduling.current_lease(db.session, now=utcnow()),
        }


@blp.route("/runs")
class JobRuns(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.ADMIN)
    @blp.arguments(RunListArgs, location="query")
    @blp.response(200, JobRunPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List job runs

        Runs of every job, or of `job`, newest first: when each started, which
        scheduler process ran it, how long it took and how it ended. Pass the
        `next_after` of a page as `after` to get the next one. Admins only.
        """
        runs = scheduling.list_runs(
            session=db.session, job=args.get("job"), after_id=args["after"], limit=args["limit"]
        )
        return keyset_page(runs, args["limit"], key=lambda run: run.id)
