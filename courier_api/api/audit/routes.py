from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView
from sqlalchemy.orm import Session

from courier_api.api.audit.schemas import (
    AuditEntryOut,
    AuditListArgs,
    AuditPage,
    AuditVerifyArgs,
    AuditVerifyOut,
)
from courier_api.api.base import RATE_LIMITED, ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.auth import current_principal
from courier_api.extensions import db
from models import AuditEntry, Role, utcnow
from sync import audit, sign_in_limits
from sync.phones import mask_phones_in_value

blp = ApiBlueprint(
    "audit",
    __name__,
    url_prefix="/api/v1/audit",
    description="The hash-chained audit log: who signed off, resolved, reopened, read what",
)
READERS = (Role.AUDITOR, Role.ADMIN)


# Reading the log is not itself logged (SECURITY.md threat 4): it shows no proof or image,
# and a read that wrote would take SQLite's writers' turn, holding up every push for as
# long as a verification walks the log. Both views only read (READS_ONLY); a check counts
# against its reader's limits first, in a short transaction of its own.
FULL_WALK = "audit_verify"  # its calls' kind in sync.sign_in_limits.admit_call
TOO_MANY_FULL_WALKS = "too_many_verifications"


@blp.route("")
class AuditEntries(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(AuditListArgs, location="query")
    @blp.response(200, AuditPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List audit entries

        Entries matching every filter given, newest first (in the order they were
        chained). `at_from` is inclusive, `at_to` exclusive; both need an offset
        (e.g. `Z`). A subject is named by `subject_type` and `subject_key`
        together (422 `subject_type_required` or `subject_key_required`; to list
        a kind of entry, filter by `action`). `tracking_no` lists every entry about
        one parcel, whatever its subject (a consent's, a flag's, a proof's id):
        its proofs and its record read, its consents granted, revoked, refused
        or withdrawn by a refusal,
        decisions on and changes of its flags (its own and its handovers'),
        decisions on, and the system's changes of, a shift's or a PDA's flags
        citing its scans, its
        changes by an intake, and auditors' searches of its proofs or rejected events by its
        number; and the entries that concern it among other parcels: the sign-off
        of each handover whose balance names it, a reopening of it by its late
        events and that reopening's withdrawal, a close of its shift for the
        courier and a last seq declared afterwards, a write-off of seqs its shift's
        PDA lost, a retention purge of its proof's images (or of those its rejected
        events name), an auditor's read of a shift page
        showing its recipient or its proof, a search, flag page or export part that
        showed its proof, a search of rejected events (or a shift or flag page) that
        showed one naming it, an auditor's read of an image its proof or one of its
        rejected events names (`blob_read`).
        Normalized as everywhere (case, spaces, dashes), one that leaves nothing
        is a 422 `invalid_tracking_no`. Entries written before the
        service kept the parcels are among them where their details name them.
        Sign-offs (`shift_signed_off`, each
        one, also of a shift reopened and signed off again), `shift_reopened`,
        `shift_reopening_withdrawn`, `flag_acknowledged`, `flag_resolved` (each with
        what the decision covered, `decided_on`), every change the system makes to a
        flag's status (`flag_status_changed`, no actor: closed as its cause went away,
        opened again, or given back a manager's decision; `from_status`, `to_status`,
        `reason`), consents recorded or
        revoked through the API (`consent_granted`, `consent_revoked`; subject
        `consent` and its id; a grant answering a courier's request names it in
        `request_id`; an answer taking a consent recorded before it, alone, writes
        `consent_request_answered`, subject `consent_request` and its id, with the
        `request_id` and the `consent_id`, the consent's `method` and `point_id` and
        the request's `asked_method` and `asked_point_id`), a recipient's refusal of a
        courier's request for consent (`consent_refused`; subject `consent_request`
        and its id, also in `request_id`) and each granted request whose consent it
        withdrew for the parcel (`consent_request_withdrawn`; subject the withdrawn
        `consent_request` and its id, with its `consent_id`, `withdrawn_at` and the
        refused request's `refusal_request_id`), each change
        of a known parcel by an intake (`parcel_updated`; subject `parcel` and its
        tracking number: who, and each changed field from and to, as `POST /parcels`
        or `courier-api import-parcels`, whose entries name no actor, took it in),
        auditors' reads
        (`proof_read`, `proofs_searched`, `proofs_exported`, `parcel_read` (also
        subject `shift`: a shift page showing its discrepancies' recipients),
        `blob_read`, `quarantine_searched`, `lost_seqs_read`), a shift closed by a
        manager or an admin for its courier (`shift_closed_for_courier`; subject
        `shift`: the `last_seq` given, `seq_at_close` (the highest seq the server
        held from the PDA then, not counting seqs written off as lost), the
        `events_taken` from under no shift) and the `last_seq` its courier's PDA
        declared for it afterwards (`shift_last_seq_declared`; the courier as actor,
        with `closed_by`), a change of a
        station (`station_updated`; subject `station` and its id: its name or time zone)
        or of a PDA's status (`device_updated`; subject `device` and its id), with
        who (`by`, also for `courier-api retire-device`, whose entries name no actor)
        and each changed field from and to, retention purges and webhook changes are
        here. A phone
        number in an entry's details is masked for admins, not for auditors.
        """
        entries = audit.list_entries(
            session=db.session,
            action=args.get("action"),
            actor_id=args.get("actor_id"),
            subject_type=args.get("subject_type"),
            subject_key=args.get("subject_key"),
            tracking_no=args.get("tracking_no"),
            at_from=args.get("at_from"),
            at_to=args.get("at_to"),
            after_id=args["after"],
            limit=args["limit"],
        )
        unmasked = current_principal().role == Role.AUDITOR
        items = [_view(entry, unmasked=unmasked) for entry in entries]
        return keyset_page(items, args["limit"], key=lambda item: item["id"])


@blp.route("/verify")
class AuditVerification(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(AuditVerifyArgs, location="query")
    @blp.response(200, AuditVerifyOut)
    @blp.alt_response(429, **RATE_LIMITED)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Verify the audit log

        Recomputes every entry's hash and its link to the entry before it, oldest
        first, as `courier-api audit verify` does, and stops at the first entry
        that breaks the chain: `intact: false` with its id and why. `checked` says
        how many entries were read. The log is read a thousand entries at a time,
        and one request reads at most `AUDIT_VERIFY_MAX_ENTRIES` (100,000 unless
        configured, some 5 seconds): a log, or the part of it after a head recorded
        long ago, longer than that answers `complete: false` with the head it
        reached (`head_id`, `head_hash`: intact up to there); give it back to go on
        from there until `complete` is true. Keep `head_id` and `head_hash` of an
        intact, complete answer outside the service: removing the newest entries
        breaks no link, and only a head recorded earlier shows it. Given back as
        `head_id` and `head_hash`, they start the next check there: that entry must
        still be in the log (`head_missing` otherwise) with that hash (`head_changed` otherwise: an
        entry up to it was altered and the chain re-hashed), and only the entries
        after it are read: its `intact` vouches for those alone. An entry before the
        head altered in place (its hash left as it was) or removed changes neither the
        head nor any entry after it; only a walk of the whole log (no head) finds it,
        so walk it whole now and then. One without the other is a 422
        (`head_hash_required`, `head_id_required`).

        A walk of the whole log (no head given) keeps a worker and the database busy:
        each user may start `AUDIT_FULL_VERIFICATIONS_PER_USER` of them (4 an hour
        unless configured). Every check, from a head or not, spends its user's
        `AUDIT_VERIFY_ENTRIES_PER_USER` (400,000 entries an hour unless configured):
        it is charged, before it starts, the entries there are to read from its head,
        in thousands rounded up, and reads no more than is left (`complete: false`
        and the head reached when that cuts it short). Beyond either, 429
        `too_many_verifications` with `Retry-After`, the seconds until the oldest
        leaves the window.
        """
        head = audit.recorded_head(args.get("head_id"), args.get("head_hash"))
        result = audit.verify(
            session=db.session,
            from_head=head,
            limit=db.write_apart(lambda session: _admit(session, head)),
        )
        return {
            "intact": result.ok,
            "complete": result.complete,
            "checked": result.checked,
            "broken_id": result.broken_id,
            "problem": result.problem,
            "message": result.message,
            "head_id": result.head_id,
            "head_hash": result.head_hash,
        }


def _admit(session: Session, head: audit.Head | None) -> int:
    """Count a check against its reader's limits, in a transaction of its own committed
    before the walk begins (the sign-in attempts' mechanism,
    ``sync.sign_in_limits``: shared by every worker and replica): a walk of the whole
    log against the walks, every check against the budget of entries
    (``audit.admit_check``); the most it may read. ``RateLimited`` once either is
    reached, nothing counted then."""
    config = current_app.config
    user = str(current_principal().user_id)
    secret = config["JWT_SECRET"].encode()
    walks = config["AUDIT_FULL_VERIFICATIONS_PER_USER"]
    if head is None and walks is not None:
        refusal = sign_in_limits.admit_call(
            session=session,
            kind=FULL_WALK,
            key=sign_in_limits.caller_key(secret=secret, kind=FULL_WALK, caller=user),
            limit=walks,
            now=utcnow(),
            what=(
                "too many verifications of the whole audit log by this account (a check "
                "from a recorded head, head_id and head_hash, counts only the entries it "
                "reads)"
            ),
            code=TOO_MANY_FULL_WALKS,
        )
        if refusal is not None:
            raise refusal
    budget = config["AUDIT_VERIFY_ENTRIES_PER_USER"]
    if budget is None:
        return config["AUDIT_VERIFY_MAX_ENTRIES"]
    return audit.admit_check(  # refused, its RateLimited rolls the walk's count back
        session=session,
        caller_key=sign_in_limits.caller_key(secret=secret, kind=audit.BUDGET_KIND, caller=user),
        budget=budget,
        from_head=head,
        max_entries=config["AUDIT_VERIFY_MAX_ENTRIES"],
        now=utcnow(),
        code=TOO_MANY_FULL_WALKS,
    )


def _view(entry: AuditEntry, *, unmasked: bool) -> dict[str, Any]:
    """The entry as its reader may see it: for anyone but an auditor a phone number
    typed into its details (a sign-off's or a resolution's note) is masked (rule 7)."""
    view = {name: getattr(entry, name) for name in AuditEntryOut().fields}
    if not unmasked:
        view["details"] = mask_phones_in_value(entry.details)
    return view
