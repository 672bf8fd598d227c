from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from flask import Response, current_app, stream_with_context
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.blobs.routes import blob_store
from courier_api.api.pagination import cursor_or_after, page_logged, walk_page
from courier_api.api.parcels.routes import timeline_view
from courier_api.api.proofs.schemas import (
    ConsentRef,
    FlagRef,
    ProofArgs,
    ProofDetailOut,
    ProofListArgs,
    ProofPage,
)
from courier_api.auth import (
    AuditorRead,
    Principal,
    current_principal,
    ensure_visible,
    record_auditor_read,
    record_auditor_reads,
)
from courier_api.config import policy_of
from courier_api.extensions import db
from models import Flag, Parcel, Role
from sync.flags import latest_decisions
from sync.pages import user_ref
from sync.paging import MAX_PAGE_SIZE, NOTHING_WALKED, walk_digest
from sync.phones import shown_phone, shown_text
from sync.proofs import (
    METHODS,
    DropConsent,
    Proof,
    ProofDetail,
    ProofFilter,
    ProofImageState,
    SearchCursor,
    check_filters,
    export_unchanged,
    get_proof,
    iter_proof_batches,
    list_proofs,
    proof_not_found,
    proofs_consents,
    proofs_events,
    proofs_images,
    repeats_of,
    search_page,
)
from sync.quarantine import count_naming
from sync.rules import Policy
from sync.spreadsheets import csv_cell
from sync.wording import counted

blp = ApiBlueprint(
    "proofs", __name__, url_prefix="/api/v1/proofs", description="Proofs of delivery"
)
READERS = (Role.AUDITOR, Role.ADMIN, Role.STATION_MANAGER)
LATEST = "latest_decision"  # a flag's, read apart (``_flag_refs``)
METHOD_OF = {event_type: name for name, event_type in METHODS.items()}
CSV_COLUMNS = (
    "event_id",
    "tracking_no",
    "station_id",
    "courier_id",
    "device_id",
    "method",
    "occurred_at",
    "occurred_at_device",
    "received_at",
    "recipient_name",
    "recipient_phone",
    "address",
    "pod_recipient_name",
    "pod_relation",
    "signature_sha256",
    "photo_sha256",
    "pickup_code",
    "lat",
    "lon",
    "distance_m",
    # Each column that came later is added last, so the columns before it keep their places.
    "voided",
    "service_class",
    "locker_id",
    "compartment",
    "point_id",
    "consent_required",
    "authorizing_consent_id",
    "authorizing_consent_channel",
    "authorizing_consent_granted_at",
    "parcel_taken_in",
    "authorizing_consent_created_at",
    "authorizing_consent_created_by",
    "seq",
    "clock_offset_ms",
    "signature_arrived_at",
    "photo_arrived_at",
    "repeat_of",
    "signature_purged_at",
    "photo_purged_at",
)
# Where a locker or pickup-point drop left the parcel, as the PDA sent it.
DROP_PLACE = ("locker_id", "compartment", "point_id")
# Proofs the export reads, writes and audit-logs at a time.
EXPORT_BATCH = MAX_PAGE_SIZE


def _filters(args: dict[str, Any], principal: Principal) -> ProofFilter:
    return ProofFilter(
        station_id=principal.station_filter(args.get("station_id")),
        tracking_no=args.get("tracking_no"),
        courier_id=args.get("courier_id"),
        occurred_from=args.get("occurred_from"),
        occurred_to=args.get("occurred_to"),
        flag_kind=args.get("flag_kind"),
        method=args.get("method"),
        flags_of_station=principal.station_filter(None),
    )


def _views(proofs: Sequence[Proof], *, auditor: bool, policy: Policy) -> list[dict[str, Any]]:
    """A page of the search, or a batch of the export, as each shows its proofs: their
    drops' consents, the scans they repeat and their images' states as recorded, read
    for all of them at once (no image hashed: ``proofs_images`` without a store)."""
    events = proofs_events(session=db.session, proofs=proofs)
    consents = proofs_consents(session=db.session, proofs=proofs, policy=policy, loaded=events)
    repeats = repeats_of(proofs, events)
    images = proofs_images(session=db.session, proofs=proofs)
    return [
        _view(
            p,
            consents.get(p.event.id),
            images[p.event.id],
            auditor=auditor,
            repeat_of=repeats.get(p.event.id),
        )
        for p in proofs
    ]


def _view(
    proof: Proof,
    drop: DropConsent | None,
    images: list[ProofImageState],
    *,
    auditor: bool,
    repeat_of: int | None,
) -> dict[str, Any]:
    """``drop``: a locker or pickup-point drop's consent (``proofs_consents``); None: in
    person, a parcel not taken in, or a drop a correction voided (not judged).
    ``images``: its POD's (``proofs_images``); ``repeat_of``: the first scan of the
    outcome it repeats (``repeats_of``)."""
    event, parcel = proof.event, proof.parcel
    consent = None if drop is None else drop.consent
    return {
        "event_id": event.id,
        "tracking_no": event.tracking_no,
        "station_id": proof.station_id,
        "parcel_taken_in": parcel is not None,
        "courier_id": event.courier_id,
        "device_id": event.device_id,
        "method": METHOD_OF[event.type],
        "voided": proof.voided,
        "repeat_of": repeat_of,
        "occurred_at": event.occurred_at,
        "occurred_at_device": event.occurred_at_device,
        "clock_offset_ms": proof.clock_offset_ms,
        "seq": event.seq,
        "received_at": event.received_at,
        **_recipient(parcel, auditor=auditor),
        **{key: shown_text(event.details.get(key), unmasked=auditor) for key in DROP_PLACE},
        "pod": _pod(event.details.get("pod", {}), auditor=auditor),
        "images": [vars(image) for image in images],
        "lat": event.lat,
        "lon": event.lon,
        "distance_m": None if proof.distance_m is None else round(proof.distance_m, 1),
        "consent_required": None if drop is None else drop.required,
        "authorizing_consent": None if consent is None else _consent_ref(consent, auditor),
    }


def _recipient(parcel: Parcel | None, *, auditor: bool) -> dict[str, Any]:
    """The parcel's own fields of a proof: all null for a parcel not taken in."""
    if parcel is None:
        return dict.fromkeys(("recipient_name", "recipient_phone", "address", "service_class"))
    return {
        "recipient_name": parcel.recipient_name,
        "recipient_phone": shown_phone(parcel.recipient_phone, unmasked=auditor),
        "address": parcel.address,
        "service_class": parcel.service_class,
    }


# What the courier typed into a POD: a phone number in it is masked but for auditors, as
# in the timeline (rule 7). The pickup code stays whole: the locker issued it.
POD_TEXTS = ("recipient_name", "relation")


def _pod(pod: dict[str, Any], *, auditor: bool) -> dict[str, Any]:
    return {
        key: shown_text(value, unmasked=auditor) if key in POD_TEXTS else value
        for key, value in pod.items()
    }


@blp.route("")
class Proofs(MethodView):
    @blp.auth(*READERS)
    @blp.arguments(ProofListArgs, location="query")
    @blp.response(200, ProofPage)
    @blp.alt_response(400, response="BAD_REQUEST")
    @blp.alt_response(410, response="GONE")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Search proofs of delivery

        Deliveries in person, to a locker or to a pickup point, oldest first,
        filtered by station, tracking number, courier, corrected time
        (`occurred_from` inclusive, `occurred_to` exclusive), the kind of flag
        their parcel has, and method. Each says its PDA's `seq`, the time the
        PDA's clock said and the corrected one with the correction applied
        (`clock_offset_ms`), and the images its POD names with whether each
        arrived (`images`). A scan repeating an outcome scanned before (the
        same delivery scanned twice) names its first scan (`repeat_of`): one
        delivery, to count once. Auditors read across stations (each search
        is audit-logged); managers their own station. A delivery a later
        correction from the same PDA voided is listed with `voided: true`: it
        proves nothing, and a voided drop's consent is not judged
        (`consent_required` and `authorizing_consent` null). A locker or
        pickup-point drop says where it was left, the consent that authorized it
        (null: none did), when and by whom that consent was recorded, and whether
        its parcel's class needed one; a drop scanned again is judged by its first
        scan, and every scan of it shows the consent the first was judged by. A
        delivery of a tracking number never
        taken in (kept and flagged `unknown_parcel`) is listed with
        `parcel_taken_in: false` and the parcel's fields null; it is the
        station's where it was recorded. Recipient phone numbers are masked except
        for auditors.

        The deliveries come in pages of `limit`, by event id: pass a page's
        `next_cursor` as `cursor`, with the same filters, for the next (null on
        the last). The pages of one walk read the matching deliveries up to
        `as_of` (the highest event id of one when it began), each once: an event's
        id is taken when its push stores it, not when the push commits, so on
        PostgreSQL a push committing late holds an id below deliveries already
        shown; above the last shown it comes in a later page, below it the walk's
        last page finds it (it compares the ids of the matching deliveries up to
        `as_of` with those shown, and its message says how many of each) and
        answers 410 `cursor_reset`: search again from the start. It does so too
        when what matches changed below the pages shown (a flag of `flag_kind`
        raised or closed, a parcel moved to another station, deliveries a PDA
        handed over pushed under another courier's sign-in until the shift's
        close filed them as its courier's: `courier_id`). A walk that ends
        with a page of `next_cursor` null held every matching delivery up to
        `as_of` committed before that page was read. Deliveries stored since it
        began are in none of its pages: `arrived_since` counts them on each page. A
        cursor that is malformed or of other filters is a 400 `cursor_malformed`.
        `after` (the last event id of the page before, its `next_after`) is
        deprecated: such a page is read as before, and can miss a delivery
        committed late below the pages read (`as_of`, `arrived_since` and
        `next_cursor` null); `after` with `cursor` is a 422 `cursor_and_after`.
        An auditor's search is on the audit log (`proofs_searched`), naming its
        filters (those set, as the export's entries name them: a tracking number as
        typed, the times as instants), the deliveries shown and the page of the
        walk: the `cursor` sent, `as_of`, the page's `offset` in the walk and its
        `entries`, `arrived_since` and the `next_cursor` given (a page read with
        `after`: that `after` and the `next_after` given).
        """
        principal = current_principal()
        filters, sent = _filters(args, principal), args.get("cursor") or None
        cursor_or_after(sent, args["after"])
        walk = None
        if args["after"]:  # deprecated: a page by id, which can miss a late commit
            proofs = list_proofs(
                session=db.session, filters=filters, after_id=args["after"], limit=args["limit"]
            )
        else:
            walk = search_page(
                session=db.session,
                filters=filters,
                cursor=SearchCursor.parse(sent),
                limit=args["limit"],
            )
            proofs = walk.proofs
        items = _views(
            proofs, auditor=principal.role == Role.AUDITOR, policy=policy_of(current_app.config)
        )
        answer = walk_page(items, args["limit"], key=lambda item: item["event_id"], walk=walk)
        # Which page of which walk it was, as ``parcel_read`` records a timeline's: the
        # walk's deliveries are those up to ``as_of``, the page its ``entries`` from
        # ``offset``. A page read by ``after`` says so.
        paging = page_logged(answer, walk, sent, args["after"])
        # Last, the page built: a search that failed before it leaves no read on record.
        record_auditor_read(
            "proofs_searched",
            "proof",
            "search",
            {"event_ids": [p.event.id for p in proofs], **filters_logged(filters), **paging},
            tracking_no=args.get("tracking_no"),  # a search of one parcel's proofs
            parcels=[p.event.tracking_no for p in proofs],
        )
        return answer


@blp.route("/export.csv")
class ProofExport(MethodView):
    @blp.auth(*READERS)
    @blp.arguments(ProofArgs, location="query")
    @blp.response(200, description="CSV, one proof per line", content_type="text/csv")
    def get(self, args: dict[str, Any]) -> Response:
        """Export proofs of delivery as CSV

        The same filters as the search, every matching proof with the search's
        fields (the POD's in columns of their own, the authorizing consent's id,
        channel, grant time, and when and by whom it was recorded, the `seq`, the
        `clock_offset_ms`, when the signature and the photo arrived, the first
        scan a repeated scan repeats, `repeat_of`, and when the retention purge
        deleted the signature's and the photo's bytes, `signature_purged_at` and
        `photo_purged_at`; the images are not hashed: a
        proof's detail says their `integrity`), streamed in batches as they are
        read, by event id, then in a last batch any delivery stored meanwhile
        with an id below those sent (a push committing late holds a lower id than
        deliveries stored after it): every matching delivery committed before the
        export's last read is in it once. For auditors each batch is audit-logged
        before it is sent, with the filters and the event ids it holds
        (`proofs_exported`, numbered `part`s of one `export_id`). The last line,
        written once every proof was, says so: `# export complete: <n> proofs
        (export <export_id>)`, unless what the filters select changed while it
        was written (a delivery written filed under another courier by a shift's
        close, a flag raised or closed, a parcel moved to another station, as a
        search walk's last page is refused with a 410 then): it ends `# export
        changed while written: ...: export again`. The status is sent before the
        first proof: a file without either line was cut short (a database error, a
        lost connection).
        """
        principal = current_principal()
        rows = csv_rows(
            _filters(args, principal), principal=principal, policy=policy_of(current_app.config)
        )
        response = Response(stream_with_context(rows), mimetype="text/csv")
        response.headers["Content-Disposition"] = 'attachment; filename="proofs.csv"'
        return response


@blp.route("/<id:event_id>")
class ProofById(MethodView):
    # courier_api.database: its read, images hashed, holds no writers' turn; an
    # auditor's read is recorded apart, after it (``record_auditor_read``)
    READS_ONLY = True

    @blp.auth(*READERS)
    @blp.response(200, ProofDetailOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    def get(self, event_id: int) -> dict[str, Any]:
        """Get a proof of delivery with its evidence

        The delivery, its POD and distance from the address, the parcel's
        event chain (device, corrected and receive times: the whole timeline when
        it has no more than 500 events, as every parcel but one a PDA scanned
        hundreds of times, else the 500 nearest the delivery in its order, from
        `timeline_offset` of `timeline_total`; `GET /api/v1/parcels/<tracking_no>`
        pages through it all), whether a correction
        voided it, for a locker or pickup-point drop the consent that authorized
        it (null: none did), and the parcel's flags and those citing the delivery,
        its PDA's `clock_jump` among them (a station manager's: their station's
        only), and how many events naming the parcel PDAs sent that the server
        rejected (`rejected_events`, as `GET /api/v1/quarantine?tracking_no=` lists
        them for the reader: a refused locker drop is evidence in a dispute).
        Each image its POD names says whether the stored bytes still are the
        image (`integrity`: `intact`, `altered` in the store since upload,
        `missing`: never uploaded or its file gone, `purged`), its file hashed
        now; the search and the export do not hash. A store that cannot be read
        answers 503 `blob_store_unavailable` (with `Retry-After`), before the read
        is audit-logged: only a read that showed the proof is on record.
        Audit-logged for auditors.
        A delivery of another station's parcel answers a manager what an unknown
        id answers (404 `proof_not_found`), so that it does not show it exists;
        one of a parcel not taken in is the station's where it was recorded.
        """
        principal = current_principal()
        detail = get_proof(
            session=db.session,
            event_id=event_id,
            policy=policy_of(current_app.config),
            flags_of_station=principal.station_filter(None),
        )
        ensure_visible(detail.proof.station_id, proof_not_found(event_id))
        # Hashed before the read is put on record, as an image's own read is: a store that
        # cannot be read (503) showed nothing, and its retry is the one read. Read whole
        # first: the record ends the request's reading transaction.
        images = proofs_images(session=db.session, proofs=[detail.proof], store=blob_store())
        auditor = principal.role == Role.AUDITOR
        shown = {
            **_view(
                detail.proof,
                detail.drop,
                images[detail.proof.event.id],
                auditor=auditor,
                repeat_of=detail.repeat_of,
            ),
            "judged_between": None
            if detail.judged_between is None
            else dict(zip(("earliest", "latest"), detail.judged_between, strict=True)),
            "timeline": [
                timeline_view(e, False, auditor, visible_station=principal.station_filter(None))
                for e in detail.timeline
            ],
            "timeline_offset": detail.timeline_offset,
            "timeline_total": detail.timeline_total,
            "rejected_events": count_naming(
                session=db.session,
                tracking_no=detail.proof.event.tracking_no,
                station_id=principal.station_filter(None),
            ),
            "flags": _flag_refs(detail.flags, principal),
        }
        record_auditor_reads([proof_read(event_id, detail)])
        return shown


def proof_read(event_id: int, detail: ProofDetail) -> AuditorRead:
    """An auditor's read of one proof (``GET /proofs/<id>``, and its web page): the
    proofs it showed, filed under their parcel."""
    tracking_no = detail.proof.event.tracking_no
    return AuditorRead(
        "proof_read",
        "proof",
        str(event_id),
        {"tracking_no": tracking_no, "event_ids": detail.proofs_shown},
        tracking_no=tracking_no,
    )


def _flag_refs(found: list[Flag], principal: Principal) -> list[dict[str, Any]]:
    """The proof's flags, each with a manager's latest decision on it (all read in one
    query): the manager named as the proof page names them (``sees_user``: another
    station's user is only an id to a station manager), the note masked but for
    auditors, as ``GET /flags/<id>`` shows it."""
    decisions = latest_decisions(session=db.session, flags=found)
    visible, auditor = principal.station_filter(None), principal.role == Role.AUDITOR
    refs = []
    for flag in found:
        ref = {name: getattr(flag, name) for name in FlagRef._declared_fields if name != LATEST}
        decision = decisions.get(flag.id)
        ref[LATEST] = (
            None
            if decision is None
            else {
                "decision": decision.status.value,
                "by": user_ref(decision.by, visible),
                "at": decision.at,
                "note": shown_text(decision.note, unmasked=auditor),
            }
        )
        refs.append(ref)
    return refs


def _consent_ref(consent: Any, auditor: bool) -> dict[str, Any]:
    """The consent that authorized the drop; its evidence is free text a courier or a
    channel may have written a phone number in: masked but for auditors (rule 7)."""
    ref = {name: getattr(consent, name) for name in ConsentRef._declared_fields}
    ref["evidence"] = shown_text(ref["evidence"], unmasked=auditor)
    return ref


def filters_logged(filters: ProofFilter) -> dict[str, str]:
    """The filters of a search or an export as an auditor's entry records them (the
    search's ``proofs_searched``, the export's ``proofs_exported``): those set, as
    typed (a tracking number) or as read (the reader's station, the times as instants),
    so that the log says what was searched, not only what it showed."""
    return {k: str(v) for k, v in vars(filters).items() if v is not None}


def csv_rows(filters: ProofFilter, *, principal: Principal, policy: Policy) -> Iterator[str]:
    """The export's CSV, a batch of lines at a time as the proofs are read (the API's and
    the pages' export are this one). The filters are checked now, before the first
    line: once a streamed answer has begun it can no longer become an error."""
    check_filters(filters)
    return _csv_lines(filters, principal=principal, policy=policy)


def _csv_lines(filters: ProofFilter, *, principal: Principal, policy: Policy) -> Iterator[str]:
    """Each batch is on the audit log, naming its proofs, before it goes out (rule 7): the
    log names exactly what was sent, also when the reader stops half-way, and the log's
    lock is held for one batch at a time."""
    auditor = principal.role == Role.AUDITOR
    logged = {
        "export_id": uuid.uuid4().hex,  # ties the parts of one export together
        **filters_logged(filters),
    }
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    batches = iter_proof_batches(session=db.session, filters=filters, batch=EXPORT_BATCH)
    written, digest, last = 0, NOTHING_WALKED, 0
    for part, proofs in enumerate(batches, start=1):
        writer.writerows(_csv_row(view) for view in _views(proofs, auditor=auditor, policy=policy))
        record_auditor_read(
            "proofs_exported",
            "proof",
            "export",
            {**logged, "part": part, "event_ids": [p.event.id for p in proofs]},
            principal=principal,
            tracking_no=filters.tracking_no,  # an export of one parcel's proofs
            parcels=[p.event.tracking_no for p in proofs],
        )
        written += len(proofs)
        digest = walk_digest((p.event.id for p in proofs), digest)
        last = max([last, *(p.event.id for p in proofs)])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    matching = (
        export_unchanged(
            session=db.session, filters=filters, written=written, digest=digest, last=last
        )
        if written
        else None
    )
    if matching is None:
        writer.writerow([export_complete(written, logged["export_id"])])
    else:
        writer.writerow([export_changed(written, matching, last, logged["export_id"])])
    yield buffer.getvalue()


# The first cell of an export's last line, written once every proof was: a file
# without it was cut short (``export_complete``).
EXPORT_COMPLETE = "# export complete"


# The first cell of an export's last line when what its filters select changed while
# it was written (``export_changed``): not complete, to be exported again.
EXPORT_CHANGED = "# export changed while written"


def export_changed(written: int, matching: int, last: int, export_id: str) -> str:
    """The export's last line when the deliveries its filters select, up to the last it
    wrote, are no longer those it wrote: a delivery written stopped matching (a shift's
    close filed it as another courier's, a flag closed, its parcel moved) or one came to
    match after its batch was read. As a search walk's last page is refused then (410),
    the file does not say it is complete: each row was true when read, the set is not."""
    return (
        f"{EXPORT_CHANGED}: {counted(written, 'proof', 'proofs')} written, {matching} "
        f"{'matches' if matching == 1 else 'match'} its filters now up to event {last} (a "
        "delivery filed under another courier by a shift's close, a flag raised or closed, "
        f"a parcel moved to another station): export again (export {export_id})"
    )


def export_complete(proofs: int, export_id: str) -> str:
    """The export's last line: its status line is sent before the first proof, so an
    export a database error or a lost connection cut short ends without this line and
    is known for one, where it ended with whole lines and a 200 that said nothing."""
    return f"{EXPORT_COMPLETE}: {proofs} proof{'' if proofs == 1 else 's'} (export {export_id})"


def _csv_row(view: dict[str, Any]) -> list[Any]:
    """A proof's view as a line of ``CSV_COLUMNS``, its cells as the search's JSON writes
    them (``csv_cell``)."""
    pod, consent = view["pod"], view["authorizing_consent"] or {}
    arrived = {image["role"]: image["arrived_at"] for image in view["images"]}
    purged = {image["role"]: image["purged_at"] for image in view["images"]}
    row = {
        **view,
        "pod_recipient_name": pod.get("recipient_name"),
        "pod_relation": pod.get("relation"),
        "signature_sha256": pod.get("signature_sha256"),
        "photo_sha256": pod.get("photo_sha256"),
        "pickup_code": pod.get("pickup_code"),
        "authorizing_consent_id": consent.get("id"),
        "authorizing_consent_channel": consent.get("channel"),
        "authorizing_consent_granted_at": consent.get("granted_at"),
        "authorizing_consent_created_at": consent.get("created_at"),
        "authorizing_consent_created_by": consent.get("created_by"),
        # when each image the POD names arrived (empty: never, or none named)
        "signature_arrived_at": arrived.get("signature"),
        "photo_arrived_at": arrived.get("photo"),
        # when the retention purge deleted its bytes (empty: held, or never arrived)
        "signature_purged_at": purged.get("signature"),
        "photo_purged_at": purged.get("photo"),
    }
    return [csv_cell(row[c]) for c in CSV_COLUMNS]
