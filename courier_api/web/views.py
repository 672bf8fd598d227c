"""The pages' routes. Thin: parse the form, check access, call ``sync``, render.

Access is the API's: managers see their own station (another station's board is a
403 page; its shift, flag or proof a 404 page, as an unknown id's, so that it does not
show it exists), admins and auditors every station; auditors only
read (no forms are shown to them, and their POSTs are refused with 403). Auditors'
reads of proofs and proof images are written to the audit log before the page or
the image goes out, as the API does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import OperationalError
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from courier_api.api.blobs.routes import blob_reader, blob_store, image_response
from courier_api.api.pagination import cursor_or_after, walk_logged
from courier_api.api.proofs.routes import csv_rows, filters_logged, proof_read
from courier_api.api.quarantine.routes import QUARANTINE_SEARCHED
from courier_api.auth import (
    AuditorRead,
    current_principal,
    ensure_station_access,
    ensure_visible,
    record_auditor_read,
    record_auditor_reads,
)
from courier_api.config import inversion_tolerance_of, policy_of
from courier_api.database import only_reads
from courier_api.errors import database_refusal, domain_status, written_while_reading
from courier_api.extensions import db
from courier_api.sign_in import sign_in_with_password
from courier_api.web import charts
from courier_api.web.forms import (
    ANY_STATUS,
    STANDING,
    WAITING,
    CloseShiftForm,
    DayArgs,
    DecisionForm,
    FlagFilter,
    LoginForm,
    LostSeqsForm,
    ProofFilter,
    SignOffCleanForm,
    SignOffForm,
    checked_shifts,
    open_flags_seen,
    parse,
    seq_ranges_typed,
)
from courier_api.web.session import (
    DECIDERS,
    PAGE_ROLES,
    USER_KEY,
    PostedFromElsewhere,
    SignInFormReplaced,
    check_csrf,
    check_login_csrf,
    csrf_token,
    keep_login_csrf,
    login_csrf_token,
    page,
    safe_next,
    sign_in,
    sign_out,
    sign_out_everywhere,
    started_elsewhere,
)
from models import Flag, FlagSeverity, FlagStatus, Role, Shift, Station, User, utcnow
from sync import directory, flags, lost_seqs, quarantine, shifts, signoffs
from sync.balances import (
    BoardRow,
    board_totals,
    station_board,
    waiting_from_earlier_days,
    where_couriers_went,
)
from sync.errors import (
    AuthenticationFailed,
    Conflict,
    CursorReset,
    DomainError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
)
from sync.handover import OUTCOMES, WHAT_TO_DO
from sync.pages import (
    consent_users,
    daily_monitoring,
    evidence_shifts,
    flag_page,
    image_states,
    local_range,
    opens_shift,
    pod_digests,
    proof_page,
    proof_rows,
    sees_user,
    shift_page,
    users_seen_by,
)
from sync.paging import MAX_PAGE_SIZE
from sync.phones import shown_phone, shown_text
from sync.proofs import (
    DELIVERY_TYPES,
    METHODS,
    SEARCHABLE_FLAG_KINDS,
    SearchCursor,
    deliveries_shown,
    get_proof,
    proof_not_found,
    search_page,
)
from sync.proofs import ProofFilter as ProofQuery
from sync.wording import counted

bp = Blueprint(
    "web",
    __name__,
    url_prefix="/web",
    static_folder="../static",
    static_url_path="/static",
)

PAGE_SIZE = 50
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
COURIER_REFUSED = (
    "Couriers sign in on their PDA. These pages are for station managers, auditors and admins."
)
OTHER_ROLE_REFUSED = (
    "This account is for systems that use the API. These pages are for station managers, "
    "auditors and admins."
)
OUTCOME_LABELS = {
    "delivered": "Delivered in person, with proof",
    "delivered_without_pod": "Delivered in person, without proof",
    "unattended": "Left in a locker or at a pickup point, authorized",
    "unattended_without_consent": "Left in a locker or at a pickup point, without consent",
    "returned": "Returned to the station",
    "missing": "Missing: checked out, no outcome",
    "no_outcome": "Not checked out in this shift, no outcome",
}


# -- every request ----------------------------------------------------------------------------


@bp.before_request
def refuse_forged_posts() -> ResponseReturnValue | None:
    if request.method != "POST":
        return None
    if started_elsewhere():  # a sibling host's form with a login cookie it planted
        raise PostedFromElsewhere()
    if request.endpoint == "web.login_submit":  # no session yet: the form's own cookie
        try:
            check_login_csrf()
        except SignInFormReplaced as replaced:
            # Another tab's sign-in page set the cookie: this form again, with its token.
            typed = request.form.get("username", "").strip()[:64]
            page = render_template(
                "web/login.html",
                next=safe_next(request.form.get("next")),
                error=replaced.description,
                username=typed,
            )
            return page, 400
    else:
        check_csrf()
    return None


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    # ``frame-ancestors 'none'`` above, for browsers that read no CSP level 2.
    response.headers["X-Frame-Options"] = "DENY"
    keep_login_csrf(response)
    if request.endpoint != "web.static":
        # Pages, exports and proof images hold recipients' data: not kept by the browser
        # after signing out (a station's shared computer). The API's images may be cached
        # (``image_response``); the pages' own stylesheet may too.
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.context_processor
def page_context() -> dict[str, Any]:
    viewer = g.get("viewer")
    unmasked = bool(viewer and viewer.is_auditor)
    return {
        "viewer": viewer,
        "csrf_token": csrf_token,
        "login_csrf_token": login_csrf_token,
        "shown_phone": lambda e164: shown_phone(e164, unmasked=unmasked),
        # Free text (a courier's reason): a phone number typed into it is masked alike.
        "shown_text": lambda text: shown_text(text, unmasked=unmasked),
        "outcome_labels": OUTCOME_LABELS,
    }


@bp.app_template_filter("local")
def local_time(moment: dt.datetime | None, timezone: str = "UTC") -> str:
    """A stored (UTC) time on the station's wall clock; in UTC, said so, where the
    wall clock would leave the calendar (a PDA that stamped a scan in the year 9999)."""
    if moment is None:
        return ""
    try:
        return moment.astimezone(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M:%S")
    except OverflowError:
        return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("clock_on")
def clock_on(moment: dt.datetime, day: dt.date, timezone: str) -> str:
    """``moment`` on the station's wall clock as a row of ``day``'s board shows it: the
    time alone on that day; off it, which day: ``00:40 (+1 day)`` for a shift closed after
    local midnight (read ``17:00–00:40`` alone, its close looks earlier than its open),
    ``23:30 (−1 day)``, and the date itself further off (a shift a manager closed days
    later), where a count of days reads worse than the date."""
    shown = moment.astimezone(ZoneInfo(timezone))
    days = shifts.days_from(day, moment, timezone)
    if days == 0:
        return f"{shown:%H:%M}"
    if abs(days) == 1:
        return f"{shown:%H:%M} ({'+' if days > 0 else '−'}1 day)"
    return f"{shown:%Y-%m-%d %H:%M}"


# What a flag's decision forms send back: they decide on the evidence the page showed.
bp.add_app_template_filter(flags.evidence_version, "evidence_version")


@bp.app_template_filter("seq_ranges")
def seq_ranges(seqs: list[int], total: int | None = None) -> str:
    """Ascending sequence numbers as runs, ``3–9, 12``; with ``total``, how many more
    there are beyond those given (a balance names the first hundred)."""
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    text = ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)
    more = (total or 0) - len(seqs)
    return f"{text} and {more} more" if more > 0 else text


@bp.app_template_filter("clock_gap")
def clock_gap(device: dt.datetime, corrected: dt.datetime) -> str:
    """How far the PDA's clock was from the corrected time: ``+2m05s``, or ``in step``."""
    seconds = round((device - corrected).total_seconds())
    if seconds == 0:
        return "in step"
    sign = "+" if seconds > 0 else "-"
    minutes, rest = divmod(abs(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{hours}h{minutes:02d}m{rest:02d}s" if hours else f"{minutes}m{rest:02d}s"
    return sign + text


@bp.errorhandler(DomainError)
def domain_error_page(error: DomainError) -> ResponseReturnValue:
    if isinstance(error, AuthenticationFailed):
        sign_out()
        flash(error.message, "error")
        return redirect(url_for("web.login"))
    status = domain_status(error)
    return render_template("web/error.html", status=status, message=error.message), status


# What a page says when the database set a manager's action aside for another change
# made at the same moment (``transaction_conflict``): the database is fine, and the
# same form sent again may well pass.
CONFLICT_NOT_SAVED = (
    "Not saved: the database set this action aside for another change made at the same "
    "moment. Nothing was changed: go back and submit the form again."
)
CONFLICT_NOT_READ = (
    "The database set this page's reading aside for another change made at the same "
    "moment: load the page again."
)
DATABASE_UNAVAILABLE = "The database is unavailable; nothing was saved. Try again later."


@bp.errorhandler(OperationalError)
def database_error_page(error: OperationalError) -> ResponseReturnValue:
    """A page, not the API's JSON body, for a request the database failed; in words
    that say whether the manager's action was saved and what to do."""
    db.rollback()
    if written_while_reading(error):
        raise error  # a view marked READS_ONLY wrote: a bug, a 500
    answer = database_refusal(error)
    if answer.code != "transaction_conflict":
        message = DATABASE_UNAVAILABLE
    elif request.method == "POST":
        message = CONFLICT_NOT_SAVED
    else:
        message = CONFLICT_NOT_READ
    page_html = render_template("web/error.html", status=503, message=message)
    return page_html, 503, {"Retry-After": str(answer.retry_after)}


@bp.errorhandler(HTTPException)
def http_error_page(error: HTTPException) -> ResponseReturnValue:
    status = error.code or 500
    message = error.description if status < 500 else "Something went wrong; it has been logged."
    return render_template("web/error.html", status=status, message=message), status


# -- signing in -------------------------------------------------------------------------------


@bp.get("/")
def home() -> ResponseReturnValue:
    return redirect(url_for("web.board"))


@bp.get("/login")
def login() -> ResponseReturnValue:
    target = safe_next(request.args.get("next"))
    # Back to the page only on our own navigation: another site's (``page``) was sent
    # here, and back there would be sent here again.
    if session.get(USER_KEY) is not None and not started_elsewhere():
        return redirect(target or url_for("web.board"))
    return render_template("web/login.html", next=target)


@bp.post("/login")
def login_submit() -> ResponseReturnValue:
    form = parse(LoginForm(), request.form)
    target = safe_next(request.form.get("next"))

    def refused(
        message: str, status: int, headers: dict[str, str] | None = None
    ) -> ResponseReturnValue:
        page = render_template(
            "web/login.html", next=target, error=message, username=form["username"]
        )
        return page, status, headers or {}

    try:
        signed_in = sign_in_with_password(form["username"], form["password"], None)
    except RateLimited as exc:
        message = exc.message[:1].upper() + exc.message[1:] + "."
        return refused(message, 429, {"Retry-After": str(exc.retry_after)})
    except AuthenticationFailed as exc:
        return refused(exc.message[:1].upper() + exc.message[1:] + ".", 401)
    except InvalidInput as exc:
        if exc.code == "device_required":  # the password was right: it is a courier
            return refused(COURIER_REFUSED, 403)
        raise
    if signed_in.user.role not in PAGE_ROLES:
        return refused(OTHER_ROLE_REFUSED, 403)
    sign_in(signed_in.user)
    return redirect(target or url_for("web.board"))


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    sign_out_everywhere()
    flash("You are signed out.", "ok")
    return redirect(url_for("web.login"))


# -- the station board ------------------------------------------------------------------------


@only_reads  # the board at 19:00 holds up no push (courier_api.database)
@bp.get("/board")
@page()
def board() -> ResponseReturnValue:
    args = parse(DayArgs(), request.args)
    return _board_page(_chosen_station(args.get("station")), args.get("date"))


def _board_page(
    station: Station,
    day: dt.date | None,
    *,
    typed: dict[str, Any] | None = None,
) -> ResponseReturnValue:
    """The station's board for ``day`` (default: today there). ``typed``: what the
    manager typed into its sign-off form (``note``) and the boxes they checked
    (``shifts``), shown again when the sign-off was refused."""
    day = day or shifts.local_date(utcnow(), station.timezone)
    rows = station_board(session=db.session, station_id=station.id, work_date=day)
    before = waiting_from_earlier_days(session=db.session, station_id=station.id, work_date=day)
    earlier = before.shifts
    went = where_couriers_went(
        db.session, station.id, [*(row.shift for row in rows), *(s for s, _ in earlier)]
    )
    visible = current_principal().station_filter(None)
    clean = {row.shift.id for row in rows if signoffs.not_clean(row.shift, row) is None}
    # Unbalanced only by discrepancies each resolved: offered to sign off together, apart.
    decided = {
        row.shift.id
        for row in rows
        if row.shift.id not in clean and signoffs.not_clean(row.shift, row, decided=True) is None
    }
    return render_template(
        "web/board.html",
        station=station,
        stations=_stations_to_pick(),
        day=day,
        rows=rows,
        totals=board_totals(rows),
        left_open=_left_open(rows, went.back),
        back=went.back,
        also=went.also_open,
        earlier=earlier,
        # The couriers the reader may know by name (``sees_user``): one who moved to
        # another station since is "a courier of another station" to this one's manager.
        named={
            courier.id
            for courier in [*(row.courier for row in rows), *(c for _, c in earlier)]
            if sees_user(courier, visible)
        },
        clean=clean,
        decided=decided,
        typed=typed,
    )


def _left_open(rows: Sequence[BoardRow], back: Mapping[int, Shift]) -> dict[str, int]:
    """Of the day's shifts still open (``board_totals``' ``open`` and ``still_out``), those
    left on a PDA whose courier is back (``where_couriers_went``), and their parcels with
    no outcome on it: not "on the road" with parcels "still out" in the board's summary
    at 19:00, when the courier is in the station and the manager has to close them."""
    left = [row for row in rows if row.shift.id in back]
    return {
        "shifts": len(left),
        "parcels": sum(row.balance.summary()["missing"] for row in left),
    }


@bp.post("/stations/<id:station_id>/signoffs")
@page(*DECIDERS)
def sign_off_clean(station_id: int) -> ResponseReturnValue:
    """The board's checked clean handovers (or all of them: ``every_clean``; or, apart, all
    those whose discrepancies are all decided: ``every_decided``) signed off with one note,
    as ``POST /api/v1/stations/<id>/signoffs`` does; each refusal is told with its
    reason. A request refused as a whole (no box checked, say), or a shift of it refused
    (its balance changed since the page was read), shows the board again, read anew,
    with the note and the boxes as they were (not redirected: a note of 2,000 characters
    does not fit in the session's cookie): the manager signs the refused rows off again
    once read, without typing the note again."""
    station = _chosen_station(station_id)
    day = parse(DayArgs(only=("date",)), request.form).get("date")  # the board's, hidden
    typed = {"note": request.form.get("note", ""), "shifts": request.form.getlist("shift")}
    # "Sign off all N clean handovers": every clean row's box as the page wrote it (its
    # hidden ``clean`` fields), not only those checked: 30 clean rows at 19:00 are one
    # click, not 30.
    # "Sign off all N handovers with every discrepancy decided": those rows (hidden
    # ``decided`` fields), each still refused if a decision was undone since.
    decided = bool(request.form.get("every_decided"))
    boxes = "decided" if decided else "clean" if request.form.get("every_clean") else "shift"
    try:
        form = parse(SignOffCleanForm(), request.form)
        outcomes = signoffs.sign_off_clean(
            session=db.session,
            station_id=station.id,
            seen=checked_shifts(request.form.getlist(boxes)),
            user_id=current_principal().user_id,
            note=form.get("note") or "",
            now=utcnow(),
            decided=decided,
        )
    except InvalidInput as exc:
        db.reads_from_here()  # rolled back: the board read again holds up no push
        flash(f"Nothing signed off: {exc.message}", "error")
        return _board_page(station, day, typed=typed)
    back = url_for("web.board", station=station.id, date=day)
    db.session.commit()
    signed = [outcome for outcome in outcomes if outcome.outcome == signoffs.SIGNED_OFF]
    # Those a press before signed off already (the button pressed again while the
    # answer was slow) are told apart: not "40 signed off" when this press signed 38.
    done = sum(not outcome.sent_again for outcome in signed)
    if done:
        flash(f"{counted(done, 'shift')} signed off.", "ok")
    if again := len(signed) - done:
        flash(
            f"{counted(again, 'shift')} {'was' if again == 1 else 'were'} already signed "
            "off, by you with this note: nothing changed for "
            f"{'it' if again == 1 else 'them'}.",
            "ok",
        )
    refused = [outcome for outcome in outcomes if outcome.outcome == signoffs.REFUSED]
    for outcome in refused:
        flash(f"Not signed off: {outcome.message}", "error")
    if not refused:
        return redirect(back)
    db.reads_from_here()  # what was signed off is committed: the board is only read
    return _board_page(station, day, typed=typed)


# -- a shift ----------------------------------------------------------------------------------


@only_reads  # the page at 19:00, its images hashed, holds up no push; reads recorded apart
@bp.get("/shifts/<id:shift_id>")
@page()
def shift(shift_id: int) -> ResponseReturnValue:
    return _shift_page(_visible_shift(shift_id))


def _visible_shift(shift_id: int) -> Shift:
    """The shift, if the viewer may see it (else a 404, as an unknown id's)."""
    found = shifts.get_shift(session=db.session, shift_id=shift_id)
    ensure_visible(found.station_id, shifts.shift_not_found(shift_id))
    return found


def _shift_page_again(shift_id: int, *, typed: dict[str, str]) -> ResponseReturnValue:
    """The shift's page after an action on it was refused (rolled back): read anew, as
    its GET reads it, in a reading transaction (``reads_from_here``), with the refusal
    flashed and what was typed. Not in the POST's writing transaction: on SQLite that
    held the one writers' turn while the whole page was read and its discrepancies'
    images hashed, and every PDA's push at 19:00 waited behind a refused sign-off."""
    db.reads_from_here()
    return _shift_page(_visible_shift(shift_id), typed=typed)


def _shift_page(found: Shift, *, typed: dict[str, str] | None = None) -> ResponseReturnValue:
    """The shift's page. ``typed``: what the manager typed into its sign-off form
    (``note``, ``force_reason``), shown again when the sign-off was refused."""
    view = shift_page(
        session=db.session,
        shift=found,
        policy=policy_of(current_app.config),
        reader=blob_reader(current_principal()),
        store=blob_store(),
        visible_station=current_principal().station_filter(None),
        unmasked=current_principal().role == Role.AUDITOR,
    )
    shown = [
        *(e.event for d in view.discrepancies for e in d.events),
        *(e for f in view.flags for e in f.events),
    ]
    proofs_shown = deliveries_shown(shown)
    reads = []
    if proofs_shown:
        reads.append(
            AuditorRead(
                "proofs_searched",
                "proof",
                f"shift:{found.id}",
                {"event_ids": proofs_shown},
                parcels=[e.tracking_no for e in shown if e.type in DELIVERY_TYPES],
            )
        )
    if view.recipients_shown:  # unmasked to an auditor, as GET /parcels/<tn> shows them
        reads.append(
            AuditorRead(
                "parcel_read",
                "shift",
                str(found.id),
                {"tracking_nos": view.recipients_shown},
                parcels=view.recipients_shown,
            )
        )
    if view.rejections_shown:
        reads.append(
            AuditorRead(
                QUARANTINE_SEARCHED,
                "quarantined_event",
                f"shift:{found.id}",
                {"ids": view.rejections_shown},
                parcels=_parcels_of_rejections(view.rejections_shown),
            )
        )
    page = render_template(
        "web/shift.html",
        view=view,
        tz=view.station.timezone,
        typed=typed,
        what_to_do=WHAT_TO_DO,
        # Asked only of a page that offers the write-off (seqs missing).
        pda_elsewhere=bool(view.balance.missing_seq_count) and _pda_elsewhere(found.device_id),
        pda_elsewhere_text=PDA_ELSEWHERE,
    )
    # Last, the page rendered, and together: a page not shown leaves no read on record.
    record_auditor_reads(reads)
    return page


def _parcels_of_rejections(ids: list[int]) -> list[str]:
    """The parcels the rejected events a page shows name, for an auditor's read of them
    (``QUARANTINE_SEARCHED``), so that each parcel's history lists it, as ``GET
    /quarantine`` files it; read for an auditor only (no one else's read is recorded)."""
    if current_principal().role != Role.AUDITOR:
        return []
    return quarantine.parcels_named_by(session=db.session, ids=ids)


def _pda_elsewhere(device_id: str) -> bool:
    """Whether the PDA is now another station's than the reader's: its lost seqs that
    no shift owns are that station's manager's to write off, those of this station's
    shifts still this one's (``sync.lost_seqs.ensure_own_station``)."""
    device = directory.get_device(session=db.session, device_id=device_id)
    return not current_principal().can_access_station(device.station_id)


@bp.post("/shifts/<id:shift_id>/close")
@page(*DECIDERS)
def close_shift(shift_id: int) -> ResponseReturnValue:
    """A manager closes a shift its courier cannot close from the PDA (a PDA that died),
    as ``POST /api/v1/shifts/<id>/close`` does for them. Refused, the page is shown
    again with the last seq as it was typed."""
    found = _visible_shift(shift_id)

    def close() -> None:
        form = parse(CloseShiftForm(), request.form)
        shifts.close_shift(
            session=db.session,
            shift=found,
            closed_by=current_principal().user_id,
            last_seq=form["last_seq"],
            now=utcnow(),
            policy=policy_of(current_app.config),
        )

    if _decide(close, done=f"Shift {shift_id} is closed.", refused="Not closed"):
        return redirect(url_for("web.shift", shift_id=shift_id))
    return _shift_page_again(shift_id, typed={"last_seq": request.form.get("last_seq", "")})


@bp.post("/shifts/<id:shift_id>/signoff")
@page(*DECIDERS)
def sign_off(shift_id: int) -> ResponseReturnValue:
    """A refused sign-off shows the page again, read anew, with the note and the reason
    as they were typed (not redirected: a note of 2,000 characters does not fit in the
    session's cookie)."""
    found = _visible_shift(shift_id)

    def sign() -> None:
        form = parse(SignOffForm(), request.form)
        shifts.sign_off(
            session=db.session,
            shift=found,
            user_id=current_principal().user_id,
            note=form["note"],
            force_reason=form["force_reason"],
            seen_version=form["balance_version"],
            seen_rejected_events=form["rejected_events"],
            seen_open_flags=open_flags_seen(form, request.form),
            seen_images_missing=form["images_missing"],
            now=utcnow(),
        )

    if _decide(sign, done=f"Shift {shift_id} is signed off.", refused="Not signed off"):
        return redirect(url_for("web.shift", shift_id=shift_id))
    typed = {name: request.form.get(name, "") for name in ("note", "force_reason")}
    return _shift_page_again(shift_id, typed=typed)


PDA_ELSEWHERE = (
    "PDA {device_id} is now another station's: write off here the seqs this station's "
    "shifts own (this one's above); those of no shift are its new station's to write off"
)


@bp.post("/shifts/<id:shift_id>/lost-seqs")
@page(*DECIDERS)
def write_off_lost_seqs(shift_id: int) -> ResponseReturnValue:
    """A manager writes off seqs the shift's PDA lost, as ``POST
    /api/v1/devices/<id>/lost-seqs`` does: those of their own station's shifts, also of
    a PDA moved to another station since, and those of no shift on their station's PDA
    (``sync.lost_seqs.ensure_own_station``). Refused, the page is shown again with the
    seqs and the reason as they were typed."""
    found = _visible_shift(shift_id)

    def write_off() -> None:
        form = parse(LostSeqsForm(), request.form)
        device = directory.get_device(session=db.session, device_id=found.device_id)
        lost_seqs.write_off_lost_seqs(
            session=db.session,
            device=device,
            ranges=lost_seqs.requested_ranges((), seq_ranges_typed(form.get("seqs"))),
            reason=form.get("reason") or "",
            user_id=current_principal().user_id,
            station_id=current_principal().station_filter(None),
            inversion_tolerance=inversion_tolerance_of(current_app.config),
        )

    done = f"The lost sequence numbers of {found.device_id} are written off."
    if _decide(write_off, done=done, refused="Not written off", also=(PermissionDenied,)):
        return redirect(url_for("web.shift", shift_id=shift_id))
    typed = {name: request.form.get(name, "") for name in ("seqs", "reason")}
    return _shift_page_again(shift_id, typed=typed)


def _decide(
    action: Callable[[], object],
    *,
    done: str,
    refused: str,
    also: tuple[type[DomainError], ...] = (),
) -> bool:
    """Run a manager's decision: committed and told as ``done`` (True); or, refused by
    the rules (a conflict, an invalid form, and the refusals ``also`` names, such as seqs
    of another station's shift a write-off may not name), rolled back and told why
    (False: the page is shown again with what was typed, not emptied)."""
    try:
        action()
    except (Conflict, InvalidInput, *also) as exc:
        db.session.rollback()
        flash(f"{refused}: {exc.message}", "error")
        return False
    db.session.commit()
    flash(done, "ok")
    return True


# -- flags ------------------------------------------------------------------------------------


@only_reads
@bp.get("/flags")
@page()
def flag_queue() -> ResponseReturnValue:
    return _flag_queue_page(request.args, here=request.full_path.rstrip("?"))


def _flag_queue_page(
    query: MultiDict[str, str],
    *,
    here: str,
    typed: dict[str, Any] | None = None,
) -> ResponseReturnValue:
    """The queue as filtered by ``query``, at ``here`` (where its forms come back to).
    ``typed``: a decision refused (``flag_id``, ``action``, ``note``): that flag's form
    shows the note again."""
    args = parse(FlagFilter(), query)
    station = _filtered_station(args.get("station"))
    raised_from, raised_to = local_range(
        args.get("raised_from"), args.get("raised_to"), station.timezone if station else "UTC"
    )
    status = args["status"]
    cursor_or_after(args.get("cursor") or None, args["after"])  # as the API refuses both
    walk = flags.walk_flags(
        session=db.session,
        station_id=station.id if station else None,
        kind=args.get("kind"),
        severity=args.get("severity"),
        status=None if status in (STANDING, WAITING, ANY_STATUS) else FlagStatus(status),
        standing=status == STANDING,
        waiting=status == WAITING,
        courier_id=args.get("courier_id"),
        shift_id=args.get("shift_id"),
        tracking_no=args.get("tracking_no") or None,
        raised_from=raised_from,
        raised_to=raised_to,
        after_id=args["after"],
        cursor=flags.FlagCursor.parse(args.get("cursor") or None),
        limit=PAGE_SIZE,
    )
    filled = {k: v for k, v in query.items() if v.strip() and k not in ("after", "cursor")}
    items = walk.items
    next_page = (
        None
        if walk.next_cursor is None
        else url_for("web.flag_queue", **filled, cursor=str(walk.next_cursor))
    )
    return render_template(
        "web/flags.html",
        items=items,
        args=filled,
        station=station,
        stations=_stations_to_pick(),
        couriers=_couriers(station),
        users=users_seen_by(
            db.session, [f.courier_id for f in items], current_principal().station_filter(None)
        ),
        evidence_shifts=evidence_shifts(
            session=db.session,
            flags=items,
            visible_station=current_principal().station_filter(None),
        ),
        kinds=flags.KINDS,
        kind=args.get("kind"),
        severities=list(FlagSeverity),
        statuses=list(FlagStatus),
        status=status,
        next_page=next_page,
        here=here,
        tz=station.timezone if station else "UTC",
        typed=typed,
    )


@only_reads  # no wait for the writers' turn at 19:00; an auditor's reads recorded apart
@bp.get("/flags/<id:flag_id>")
@page()
def flag(flag_id: int) -> ResponseReturnValue:
    found = flags.get_flag(session=db.session, flag_id=flag_id)
    ensure_visible(found.station_id, flags.flag_not_found(flag_id))
    return _flag_page(found)


def _flag_page(found: Flag, *, typed: dict[str, Any] | None = None) -> ResponseReturnValue:
    """The flag's page; ``typed`` as for ``_flag_queue_page``."""
    view = flag_page(
        session=db.session,
        flag=found,
        visible_station=current_principal().station_filter(None),
        unmasked=current_principal().role == Role.AUDITOR,
    )
    # Its evidence's deliveries show their POD, as the shift page does: logged alike.
    proofs_shown = deliveries_shown(view.events)
    reads = []
    if proofs_shown:
        reads.append(
            AuditorRead(
                "proofs_searched",
                "proof",
                f"flag:{found.id}",
                {"event_ids": proofs_shown},
                tracking_no=found.tracking_no,  # a parcel's flag: its proofs
                parcels=[e.tracking_no for e in view.events if e.type in DELIVERY_TYPES],
            )
        )
    if view.rejections:  # unmasked to an auditor, as on the shift's page
        reads.append(
            AuditorRead(
                QUARANTINE_SEARCHED,
                "quarantined_event",
                f"flag:{found.id}",
                {"ids": [r["id"] for r in view.rejections]},
                parcels=_parcels_of_rejections([r["id"] for r in view.rejections]),
            )
        )
    station = (
        directory.get_station(session=db.session, station_id=found.station_id)
        if found.station_id
        else None
    )
    page = render_template(
        "web/flag.html",
        view=view,
        here=url_for("web.flag", flag_id=found.id),
        tz=station.timezone if station else "UTC",
        typed=typed,
    )
    # Last, the page rendered, and together: a page not shown leaves no read on record.
    record_auditor_reads(reads)
    return page


@bp.post("/flags/<id:flag_id>/acknowledge")
@page(*DECIDERS)
def acknowledge_flag(flag_id: int) -> ResponseReturnValue:
    return _decide_flag(flag_id, "acknowledge", flags.acknowledge_flag, done="acknowledged")


@bp.post("/flags/<id:flag_id>/resolve")
@page(*DECIDERS)
def resolve_flag(flag_id: int) -> ResponseReturnValue:
    return _decide_flag(flag_id, "resolve", flags.resolve_flag, done="resolved")


def _decide_flag(
    flag_id: int, action: str, decision: Callable[..., Flag], *, done: str
) -> ResponseReturnValue:
    """A flag's ``action`` form sent: ``decision`` (``flags.acknowledge_flag`` or
    ``flags.resolve_flag``) taken on the evidence the page showed, the page then saying
    the flag is ``done`` or why it is not (``_after_flag_decision``)."""
    found = flags.get_flag(session=db.session, flag_id=flag_id)
    ensure_visible(found.station_id, flags.flag_not_found(flag_id))

    def decide() -> None:
        form = parse(DecisionForm(), request.form)
        decision(
            session=db.session,
            flag=found,
            user_id=current_principal().user_id,
            note=form["note"] or "",  # left empty: no note (``flags`` reads "" as none)
            seen_version=form["evidence_version"],
        )

    decided = _decide(decide, done=f"Flag {flag_id} is {done}.", refused=f"Not {done}")
    return _after_flag_decision(found, action, decided)


def _after_flag_decision(found: Flag, action: str, decided: bool) -> ResponseReturnValue:
    """Back to the page the decision was made on (``next``: the queue as filtered, or
    the flag's page). Refused, that page is shown again, read anew as its GET reads it
    (in a reading transaction), with the note typed into that flag's ``action`` form."""
    back = safe_next(request.form.get("next"))
    if decided:
        return redirect(back or url_for("web.flag", flag_id=found.id))
    db.reads_from_here()  # rolled back: the page read again holds up no push
    typed = {"flag_id": found.id, "action": action, "note": request.form.get("note", "")}
    if back is not None:
        target = urlsplit(back)
        if target.path == url_for("web.flag_queue"):
            query = MultiDict(parse_qsl(target.query, keep_blank_values=True))
            return _flag_queue_page(query, here=back, typed=typed)
    return _flag_page(found, typed=typed)


# -- proofs -----------------------------------------------------------------------------------


@only_reads  # an auditor's read recorded apart, last
@bp.get("/proofs")
@page()
def proofs() -> ResponseReturnValue:
    """Proofs matching the filters, a page at a time. Their images are listed as recorded,
    not hashed (the proof's page, linked from each row, says whether they are intact):
    as the API's search, so that a view costs no read of up to a page of image files.
    Its next page goes on by the search's cursor, as the API's does (``search_page``):
    by id (``after``), a delivery whose push committed late below the pages shown was
    in none of them; the walk's last page finds it and the page says so (a 410: search
    again), showing no proof and putting no read on record."""
    args = parse(ProofFilter(), request.args)
    query, station = _proof_query(args)
    filled = {k: v for k, v in request.args.items() if v.strip() and k not in ("after", "cursor")}
    sent = args.get("cursor") or None
    try:
        walk = search_page(
            session=db.session, filters=query, cursor=SearchCursor.parse(sent), limit=PAGE_SIZE
        )
    except CursorReset:
        # Deliveries of the search committed late below the pages shown (or it changed
        # there): its last page would have said "that is all" without them.
        reset = render_template(
            "web/proofs.html",
            **_proofs_page_context(args, station, filled),
            rows=[],
            users={},
            walk_reset=True,
            next_page=None,
            arrived_since=0,
        )
        return reset, 410
    found = walk.proofs
    rows = proof_rows(
        session=db.session,
        proofs=found,
        policy=policy_of(current_app.config),
        reader=blob_reader(current_principal()),
    )
    recorders = [i for r in rows if r.drop for i in consent_users(r.drop.consent)]
    shown = render_template(
        "web/proofs.html",
        **_proofs_page_context(args, station, filled),
        rows=rows,
        users=users_seen_by(
            db.session,
            [*(p.event.courier_id for p in found), *recorders],
            current_principal().station_filter(None),
        ),
        walk_reset=False,
        next_page=None
        if walk.next_cursor is None
        else url_for("web.proofs", **filled, cursor=str(walk.next_cursor)),
        arrived_since=walk.arrived_since,
    )
    # Last, the page rendered: a page not shown leaves no read on record.
    record_auditor_read(
        "proofs_searched",
        "proof",
        "search",
        {
            "event_ids": [p.event.id for p in found],
            **filters_logged(query),
            **walk_logged(walk, sent, len(found)),
        },
        tracking_no=query.tracking_no,  # a search of one parcel's proofs
        parcels=[p.event.tracking_no for p in found],
    )
    return shown


def _proofs_page_context(
    args: dict[str, Any], station: Station | None, filled: dict[str, str]
) -> dict[str, Any]:
    """What the proofs page shows around its rows: the filters as typed and the export."""
    return {
        "couriers": _couriers(station),
        "args": filled,
        "station": station,
        "stations": _stations_to_pick(),
        "methods": list(METHODS),
        "flag_kinds": SEARCHABLE_FLAG_KINDS,
        "flag_kind": args.get("flag_kind"),  # as its code, however it was typed
        "export_url": url_for("web.export_proofs", **filled),
        "search_again": url_for("web.proofs", **filled),
        "tz": station.timezone if station else "UTC",
    }


@bp.get("/proofs/export.csv")
@page()
def export_proofs() -> ResponseReturnValue:
    """Every proof matching the page's filters, as the API's export writes them."""
    query, _ = _proof_query(parse(ProofFilter(), request.args))
    rows = csv_rows(  # checks the filters first; audit-logs each batch as it is sent
        query, principal=current_principal(), policy=policy_of(current_app.config)
    )
    response = Response(stream_with_context(rows), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="proofs.csv"'
    return response


@only_reads  # its images hashed holding up no push; an auditor's reads recorded apart, last
@bp.get("/proofs/<id:event_id>")
@page()
def proof(event_id: int) -> ResponseReturnValue:
    detail = get_proof(
        session=db.session,
        event_id=event_id,
        policy=policy_of(current_app.config),
        flags_of_station=current_principal().station_filter(None),
    )
    ensure_visible(detail.proof.station_id, proof_not_found(event_id))
    pod = detail.proof.event.details.get("pod")
    # Hashed before the read is put on record: a store that cannot be read (503) showed
    # nothing, and its retry is the one read.
    states = image_states(
        session=db.session,
        digests=[d for _, d in pod_digests(pod)],
        reader=blob_reader(current_principal()),
        store=blob_store(),
    )
    station = directory.get_station(session=db.session, station_id=detail.proof.station_id)
    visible_station = current_principal().station_filter(None)
    view = proof_page(
        session=db.session,
        detail=detail,
        visible_station=visible_station,
        unmasked=current_principal().role == Role.AUDITOR,
    )
    reads = [proof_read(event_id, detail)]
    if view.rejections_shown:  # as the shift page's: a read of the quarantine
        reads.append(
            AuditorRead(
                QUARANTINE_SEARCHED,
                "quarantined_event",
                f"proof:{event_id}",
                {"tracking_no": detail.proof.event.tracking_no, "ids": view.rejections_shown},
                tracking_no=detail.proof.event.tracking_no,
            )
        )
    shown = render_template(
        "web/proof.html",
        detail=detail,
        consents_on_record=view.consents_on_record,
        rejections=view.rejections,
        more_rejections=view.more_rejections,
        rejected_total=view.rejected_total,
        decisions=view.decisions,
        shift_shown=opens_shift(detail.proof.event, visible_station),
        images=[(role, digest, states[digest]) for role, digest in pod_digests(pod)],
        consent_required=detail.consent_required,
        users=view.users,
        tz=station.timezone,
    )
    # Last, the page rendered, and together: a page not shown leaves no read on record.
    record_auditor_reads(reads)
    return shown


@only_reads  # read and hashed as served, holding up no push; an auditor's read apart
@bp.get("/images/<string:sha256>")
@page()
def image(sha256: str) -> ResponseReturnValue:
    """A proof image, as ``GET /api/v1/blobs/<sha256>`` serves it, for a signed-in page;
    not kept by the browser, as the pages (``security_headers``)."""
    return image_response(sha256, current_principal())


# -- the daily report -------------------------------------------------------------------------


@only_reads
@bp.get("/reports/daily")
@page()
def daily_report() -> ResponseReturnValue:
    args = parse(DayArgs(), request.args)
    station = _chosen_station(args.get("station"))
    monitoring = daily_monitoring(
        session=db.session,
        station_id=station.id,
        day=args.get("date"),
        deadlines=current_app.config["DELIVERY_DEADLINE_HOURS"],
        now=utcnow(),
    )
    body = monitoring.report
    couriers = [
        (
            c["full_name"] or c["username"],
            {
                **charts.outcome_values(c),
                "discrepancies": monitoring.discrepancies.get(c["courier_id"], 0),
            },
        )
        for c in body["couriers"]
    ]
    week = [(d["date"], charts.outcome_values(d)) for d in monitoring.week]
    return render_template(
        "web/report.html",
        station=station,
        stations=_stations_to_pick(),
        report=body,
        day=dt.date.fromisoformat(body["period_start"]),
        couriers=couriers,
        week=monitoring.week,
        courier_chart=charts.courier_chart(couriers),
        week_chart=charts.week_chart(week),
        outcomes=OUTCOMES,
    )


@bp.get("/<path:unknown>")
def no_such_page(unknown: str) -> ResponseReturnValue:
    """Any other address under /web: a 404 page, not the API's JSON (and a 405 page for
    a GET of a form's target, such as /web/logout)."""
    try:
        current_app.url_map.bind_to_environ(request.environ).match(method="POST")
    except HTTPException:
        raise NotFound(f"there is no page /web/{unknown}", code="page_not_found") from None
    raise MethodNotAllowed(valid_methods=["POST"])


# -- helpers ----------------------------------------------------------------------------------


def _chosen_station(requested: int | None) -> Station:
    """The station a board or report shows: a manager's own (another is a 403); for
    admins and auditors the one asked for, else the first."""
    principal = current_principal()
    if requested is None:
        if principal.station_id is not None:
            requested = principal.station_id
        else:
            first = directory.list_stations(session=db.session, limit=1)
            if not first:
                raise NotFound("there is no station yet", code="station_not_found")
            requested = first[0].id
    ensure_station_access(requested)
    return directory.get_station(session=db.session, station_id=requested)


def _filtered_station(requested: int | None) -> Station | None:
    """The station a list is limited to: a manager's own; for the others the one asked
    for, or None for every station."""
    principal = current_principal()
    if requested is None and principal.is_cross_station:
        return None
    return _chosen_station(requested)


def _couriers(station: Station | None) -> list[User]:
    """The couriers a filter offers: the station's (none when every station is shown)."""
    if station is None:
        return []
    return list(
        directory.list_users(
            session=db.session, station_id=station.id, role=Role.COURIER, limit=MAX_PAGE_SIZE
        )
    )


def _stations_to_pick() -> list[Station]:
    if not current_principal().is_cross_station:
        return []
    return list(directory.list_stations(session=db.session, limit=MAX_PAGE_SIZE))


def _proof_query(args: dict[str, Any]) -> tuple[ProofQuery, Station | None]:
    station = _filtered_station(args.get("station"))
    occurred_from, occurred_to = local_range(
        args.get("occurred_from"),
        args.get("occurred_to"),
        station.timezone if station else "UTC",
    )
    query = ProofQuery(
        station_id=station.id if station else None,
        tracking_no=args.get("tracking_no"),
        courier_id=args.get("courier_id"),
        occurred_from=occurred_from,
        occurred_to=occurred_to,
        flag_kind=args.get("flag_kind"),
        method=args.get("method"),
        flags_of_station=current_principal().station_filter(None),
    )
    return query, station
