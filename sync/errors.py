"""Domain errors. The web edge maps each class to one HTTP status, in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a stable machine ``code``, a human message, and the field at fault."""

    code = "domain_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field


class InvalidInput(DomainError):
    """Well-formed request, but a value breaks a domain rule."""

    code = "invalid_input"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    """The request contradicts what is stored (a duplicate name, a state that forbids it)."""

    code = "conflict"


class PermissionDenied(DomainError):
    code = "forbidden"


class AuthenticationFailed(DomainError):
    code = "unauthorized"


class LimitExceeded(DomainError):
    """More items than one request may carry. ``limit`` and ``unit`` say how many fit
    (``5000``, ``"events"``): a client splits by them without reading the message."""

    code = "payload_too_large"

    def __init__(self, message: str, *, limit: int, unit: str, field: str | None = None):
        super().__init__(message, field=field)
        self.limit = limit
        self.unit = unit


class Gone(DomainError):
    """It existed and was removed on purpose (a proof image past its retention)."""

    code = "gone"


class InvalidCursor(DomainError):
    """A cursor this server never handed out in that form: a pull's (``sync.feed``), or
    a walk through a parcel's timeline's, malformed or of another parcel's walk
    (``sync.parcels``); a proof search's, malformed or of other filters
    (``sync.proofs``)."""

    code = "cursor_malformed"


class CursorReset(DomainError):
    """The cursor cannot be gone on from: a pull's is unknown here (another database, or
    expired): pull again from scratch (``sync.feed``); a timeline walk's parcel gained
    events below its ``as_of`` since it began: walk again from the start
    (``sync.parcels``); a proof search's walk found deliveries below the pages it showed
    that it did not show (a push committed late): search again (``sync.proofs``); a
    walk through the flags found more raised below where it began than its first page
    counted (a push committed late): list again (``sync.flags.check_flag_walk``)."""

    code = "cursor_reset"


class RetryLater(DomainError):
    """Refused for now: the same request may be sent again after ``retry_after``
    seconds (at least one; answered as the ``Retry-After`` header)."""

    def __init__(self, message: str, *, retry_after: int, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after))


class RateLimited(RetryLater):
    """Too many attempts: try again after ``retry_after`` seconds."""

    code = "too_many_requests"


class Unavailable(RetryLater):
    """A store the request needs cannot be used now (a full or unwritable disk): nothing
    was stored, and the same request may be sent again after ``retry_after`` seconds."""

    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 30, code: str | None = None):
        super().__init__(message, retry_after=retry_after, code=code)
