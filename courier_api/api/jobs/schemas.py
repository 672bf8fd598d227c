import marshmallow as ma

from courier_api.api.base import PageArgs
from courier_api.api.fields import After, Text
from courier_api.scheduler import JOB_SPECS
from sync.scheduling import FAILED, OK, RUNNING


def _registered(name: str) -> None:
    if name not in JOB_SPECS:
        raise ma.ValidationError(f"no job {name!r}; jobs: {', '.join(JOB_SPECS)}")


class RunListArgs(PageArgs):
    job = Text(
        validate=_registered,
        metadata={
            "description": f"Only this job's runs: one of {', '.join(JOB_SPECS)}",
            "example": "stale_device",
        },
    )
    after = After()


class JobRunOut(ma.Schema):
    id = ma.fields.Integer(required=True)
    job = ma.fields.String(required=True, metadata={"example": "shift_not_closed"})
    holder = ma.fields.String(
        required=True, metadata={"description": "The scheduler process (host:pid:suffix)"}
    )
    started_at = ma.fields.AwareDateTime(required=True)
    finished_at = ma.fields.AwareDateTime(allow_none=True, required=True)
    duration_ms = ma.fields.Integer(allow_none=True, required=True)
    outcome = ma.fields.String(
        required=True,
        validate=ma.validate.OneOf((RUNNING, OK, FAILED)),
        metadata={"description": "running, ok or failed"},
    )
    detail = ma.fields.Dict(
        required=True,
        metadata={"description": "What the job did: counts, ids of the flags it raised"},
    )
    error = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Why the run failed"}
    )


class LeaseOut(ma.Schema):
    holder = ma.fields.String(required=True)
    acquired_at = ma.fields.AwareDateTime(required=True)
    expires_at = ma.fields.AwareDateTime(required=True)


class JobOut(ma.Schema):
    name = ma.fields.String(required=True, metadata={"example": "stale_device"})
    description = ma.fields.String(required=True)
    interval_seconds = ma.fields.Integer(required=True, metadata={"example": 300})
    last_run = ma.fields.Nested(
        JobRunOut, allow_none=True, required=True, metadata={"description": "null: never run"}
    )


class JobCatalogueOut(ma.Schema):
    jobs = ma.fields.List(ma.fields.Nested(JobOut), required=True)
    lease = ma.fields.Nested(
        LeaseOut,
        allow_none=True,
        required=True,
        metadata={"description": "The scheduler running the jobs now; null: none is"},
    )


class JobRunPage(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(JobRunOut), required=True)
    next_after = ma.fields.Integer(allow_none=True, required=True)
