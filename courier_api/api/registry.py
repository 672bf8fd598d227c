"""Every blueprint of the API, in the order they appear in the docs."""

from courier_api.api.audit.routes import blp as audit_blp
from courier_api.api.auth.routes import blp as auth_blp
from courier_api.api.blobs.routes import blp as blobs_blp
from courier_api.api.consents.routes import blp as consents_blp
from courier_api.api.devices.routes import blp as devices_blp
from courier_api.api.flags.routes import blp as flags_blp
from courier_api.api.health.routes import blp as health_blp
from courier_api.api.jobs.routes import blp as jobs_blp
from courier_api.api.parcels.routes import blp as parcels_blp
from courier_api.api.proofs.routes import blp as proofs_blp
from courier_api.api.quarantine.routes import blp as quarantine_blp
from courier_api.api.reports.routes import blp as reports_blp
from courier_api.api.shifts.routes import blp as shifts_blp
from courier_api.api.stations.routes import blp as stations_blp
from courier_api.api.sync.routes import blp as sync_blp
from courier_api.api.users.routes import blp as users_blp
from courier_api.api.webhooks.routes import blp as webhooks_blp

BLUEPRINTS = (
    health_blp,
    auth_blp,
    stations_blp,
    users_blp,
    devices_blp,
    parcels_blp,
    sync_blp,
    blobs_blp,
    consents_blp,
    proofs_blp,
    quarantine_blp,
    flags_blp,
    audit_blp,
    shifts_blp,
    reports_blp,
    jobs_blp,
    webhooks_blp,
)
