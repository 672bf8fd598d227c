from __future__ import annotations

import datetime as dt
from typing import Any

from flask import current_app
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.api.webhooks.schemas import (
    TOPIC_DATA,
    DeliveryDetailOut,
    DeliveryListArgs,
    DeliveryOut,
    DeliveryPage,
    PurgeIn,
    PurgeOut,
    SecretRotationIn,
    SubscriptionCreatedOut,
    SubscriptionIn,
    SubscriptionListArgs,
    SubscriptionOut,
    SubscriptionPage,
    SubscriptionPatch,
    TopicList,
    WebhookEnvelope,
)
from courier_api.auth import current_principal
from courier_api.extensions import db
from models import Role, WebhookDelivery, WebhookSubscription, utcnow
from sync import webhooks
from sync.outbox import TOPICS
from sync.phones import mask_phones_in_message

blp = ApiBlueprint(
    "webhooks",
    __name__,
    url_prefix="/api/v1/webhooks",
    description="Webhook subscriptions and their deliveries (admins)",
)
# Delivery ids are 64-bit; larger numbers are a 404, never a database error.
DELIVERY_ID = "<int(min=1, max=9223372036854775807):delivery_id>"

CALLBACK_DESCRIPTION = """\
The envelope (`id`, `topic`, `created_at`, `station_id`) with the topic's `data`,
as compact UTF-8 JSON, signed as sent: see POST /api/v1/webhooks/subscriptions for
how to verify `X-Courier-Signature`. Answer 2xx to acknowledge; anything else is
retried. De-duplicate on `X-Courier-Delivery`.
"""


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "in": "header",
        "name": name,
        "required": True,
        "description": description,
        "schema": schema,
    }


# The request a receiver gets, as an OpenAPI 3.0 callback of POST /subscriptions.
WEBHOOK_CALLBACK = {
    "message": {
        "{$request.body#/url}": {
            "post": {
                "summary": "A message, posted to the subscription's URL",
                "description": CALLBACK_DESCRIPTION,
                "security": [],
                "parameters": [
                    _header(
                        "X-Courier-Topic",
                        "The message's topic",
                        {"type": "string", "enum": list(TOPICS)},
                    ),
                    _header(
                        "X-Courier-Delivery",
                        "The delivery's id: the same on every attempt (de-duplicate on it)",
                        {"type": "string", "format": "uuid"},
                    ),
                    _header(
                        "X-Courier-Attempt",
                        "Which attempt this is, from 1",
                        {"type": "integer", "minimum": 1},
                    ),
                    _header(
                        "X-Courier-Signature",
                        "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + body)>",
                        {"type": "string", "pattern": "^t=[0-9]+,v1=[0-9a-f]{64}$"},
                    ),
                    _header(
                        "User-Agent",
                        "courier-field-api/<version>",
                        {"type": "string", "example": webhooks.USER_AGENT},
                    ),
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "allOf": [
                                    WebhookEnvelope,
                                    {
                                        "type": "object",
                                        "properties": {
                                            "data": {"oneOf": list(TOPIC_DATA.values())}
                                        },
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "2XX": {"description": "Received: the delivery is done"},
                    "default": {
                        "description": "Not received (any other status, a timeout or a "
                        "refused connection): the delivery is attempted again later"
                    },
                },
            }
        }
    }
}


def _production() -> bool:
    return bool(current_app.config["APP_ENV"] == "production")


# -- subscriptions ----------------------------------------------------------------------------


@blp.route("/subscriptions")
class Subscriptions(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.ADMIN)
    @blp.arguments(SubscriptionListArgs, location="query")
    @blp.response(200, SubscriptionPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List webhook subscriptions

        In the order they were created; the secrets are never shown. A subscription
        with `disabled_at` set was disabled after failing too often in a row (PATCH
        `active: true` enables it again). Admins only.
        """
        items = webhooks.list_subscriptions(
            session=db.session, after_id=args["after"], limit=args["limit"]
        )
        return keyset_page(items, args["limit"], key=lambda subscription: subscription.id)

    @blp.auth(Role.ADMIN)
    @blp.arguments(SubscriptionIn)
    @blp.response(201, SubscriptionCreatedOut)
    @blp.doc(callbacks=WEBHOOK_CALLBACK)
    def post(self, body: dict[str, Any]) -> WebhookSubscription:
        """Subscribe a URL to webhook messages

        Messages of the chosen `topics` (of one `station_id`, or of every station)
        are posted to `url` from now on (the callback below shows the request). The
        answer holds the subscription's `secret`, which signs every message: **this
        is the only answer that shows it**; store it where your receiver can read
        it. `url` must use https; http is allowed only to localhost (127.0.0.0/8,
        ::1) outside production; no user name or password, no fragment. Admins only.

        **Signature.** `X-Courier-Signature: t=<unix seconds>,v1=<hex>`, where
        `<hex>` is the HMAC-SHA256, keyed with the secret, of the bytes `<t>.`
        followed by the body exactly as received. Compute it before parsing the
        body, compare in constant time, and refuse a `t` more than 5 minutes away
        from your clock (a captured request cannot be replayed later).

        **Delivery.** `X-Courier-Delivery` is the delivery's id, the same on every
        attempt and replay: de-duplicate on it, delivery is at least once. A 2xx
        answer within WEBHOOK_TIMEOUT_SECONDS (10 s) acknowledges the message;
        anything else (3xx included: redirects are not followed), a timeout or a
        refused connection is retried with exponential backoff and jitter, up to
        WEBHOOK_MAX_ATTEMPTS (20, over 5 to 10 hours) attempts; then the delivery is
        dead until an admin replays it. Only the first WEBHOOK_MAX_RESPONSE_BYTES of
        an answer are read.
        Messages with one ordering key (one parcel's) reach you in the order they
        were written; a dead one does not hold back those after it.

        **Disabling.** After WEBHOOK_DISABLE_AFTER_FAILURES (20) failed attempts in
        a row, the first of them WEBHOOK_DISABLE_AFTER_SECONDS (4 hours) before
        (`failing_since`), the subscription is disabled (its messages wait, up to
        WEBHOOK_RETENTION_DAYS (30) after they were written) and a
        `webhook_subscription_disabled` flag is raised; PATCH `active: true` once
        the receiver works again.
        """
        subscription = webhooks.create_subscription(
            session=db.session,
            url=body["url"],
            topics=body["topics"],
            station_id=body["station_id"],
            description=body["description"],
            created_by=current_principal().user_id,
            production=_production(),
        )
        db.session.commit()
        return subscription


@blp.route("/subscriptions/<id:subscription_id>")
class SubscriptionById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.ADMIN)
    @blp.response(200, SubscriptionOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, subscription_id: int) -> WebhookSubscription:
        """Get a webhook subscription

        Without its secret, which only the creation answer shows. Admins only.
        """
        return webhooks.get_subscription(session=db.session, subscription_id=subscription_id)

    @blp.auth(Role.ADMIN)
    @blp.arguments(SubscriptionPatch)
    @blp.response(200, SubscriptionOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def patch(self, body: dict[str, Any], subscription_id: int) -> WebhookSubscription:
        """Change a webhook subscription

        Change its `url`, `topics`, `station_id` (null: every station) or
        `description`. `active: false` stops it: the deliveries it has wait, and
        nothing new is written for it until `active: true` (messages announced in
        between are not kept for it). On a subscription disabled after too many
        failures, its messages wait. Either way a message waits up to
        WEBHOOK_RETENTION_DAYS (30) after it was written, then it is deleted (it
        holds a recipient's phone; the audit log counts what went, by
        subscription). `active: true` enables it again: its failure count starts over, its flag is
        closed and its waiting messages are sent at once. Pending messages go to the
        new `url`; those it no longer covers after a change of `station_id` or
        `topics` (another station's, or of a topic it dropped) are deleted, never
        sent. Admins only.
        """
        subscription = webhooks.get_subscription(
            session=db.session, subscription_id=subscription_id
        )
        webhooks.update_subscription(
            session=db.session,
            subscription=subscription,
            production=_production(),
            now=utcnow(),
            actor_id=current_principal().user_id,
            url=body.get("url"),
            topics=body.get("topics"),
            station_id=body.get("station_id", webhooks.KEEP),
            description=body.get("description"),
            active=body.get("active"),
        )
        db.session.commit()
        return subscription


@blp.route("/subscriptions/<id:subscription_id>/secret")
class SubscriptionSecret(MethodView):
    @blp.auth(Role.ADMIN)
    @blp.arguments(SecretRotationIn)
    @blp.response(200, SubscriptionCreatedOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def post(self, body: dict[str, Any], subscription_id: int) -> WebhookSubscription:
        """Rotate a webhook subscription's secret

        The answer holds the new `secret` (**only this answer shows it**). For
        `grace_hours` (default 24, at most 168) every delivery is signed with the
        old secret too: `X-Courier-Signature: t=<t>,v1=<new>,v1=<old>`, so that
        nothing waiting or in flight is refused while your receiver switches
        (accept a message when any `v1` matches the secret you hold); until
        `rotation_grace_until`. `grace_hours: 0` drops the old secret at once (it
        leaked): from then on deliveries carry the new secret's signature only.
        Pending deliveries are kept either way, signed anew on each attempt. Audit-logged
        (`webhook_secret_rotated`, never the secret). Admins only.
        """
        subscription = webhooks.get_subscription(
            session=db.session, subscription_id=subscription_id
        )
        webhooks.rotate_secret(
            session=db.session,
            subscription=subscription,
            grace=dt.timedelta(hours=body["grace_hours"]),
            now=utcnow(),
            actor_id=current_principal().user_id,
        )
        db.session.commit()
        return subscription


@blp.route("/topics")
class Topics(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.ADMIN)
    @blp.response(200, TopicList)
    def get(self) -> dict[str, Any]:
        """List the webhook topics

        Every topic a subscription may ask for, with what its message says; the
        callback of POST /webhooks/subscriptions documents each topic's `data`.
        Admins only.
        """
        return {
            "topics": [
                {"name": name, "description": description} for name, description in TOPICS.items()
            ]
        }


# -- deliveries -------------------------------------------------------------------------------


@blp.route("/deliveries")
class Deliveries(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.ADMIN)
    @blp.arguments(DeliveryListArgs, location="query")
    @blp.response(200, DeliveryPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List webhook deliveries

        One delivery per message and subscription, newest first, matching every
        filter given: `pending` (waiting for its first or next attempt),
        `delivered`, `dead` (attempts exhausted; `last_error` says why), or
        `skipped` (not sent, moot by the time it was due: a `consent.requested`
        whose request was answered, lapsed or cancelled; `skipped_reason` says
        why). Pass
        the `next_after` of a page as `after` to get the next one. Admins only.
        """
        items = webhooks.list_deliveries(
            session=db.session,
            status=args.get("status"),
            subscription_id=args.get("subscription_id"),
            topic=args.get("topic"),
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page(items, args["limit"], key=lambda delivery: delivery.id)


@blp.route(f"/deliveries/{DELIVERY_ID}")
class DeliveryById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.ADMIN)
    @blp.response(200, DeliveryDetailOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, delivery_id: int) -> dict[str, Any]:
        """Get a webhook delivery with its message

        `message` is the envelope the receiver gets (its body, before encoding).
        Admins only.
        """
        delivery = webhooks.get_delivery(session=db.session, delivery_id=delivery_id)
        return _with_message(delivery)


@blp.route(f"/deliveries/{DELIVERY_ID}/replay")
class ReplayDelivery(MethodView):
    @blp.auth(Role.ADMIN)
    @blp.response(200, DeliveryOut)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    def post(self, delivery_id: int) -> WebhookDelivery:
        """Replay a webhook delivery

        Sends a `dead`, `delivered` or `skipped` delivery again (a skipped one
        still moot is skipped again), from a first attempt, with the
        same `X-Courier-Delivery` id (a receiver that has it already can tell). It
        goes before any later message of its ordering key still pending. A pending
        delivery cannot be replayed (409 `delivery_pending`): it will be attempted
        anyway; nor one of a paused or disabled subscription (409
        `subscription_stopped`): enable it first. Admins only.
        """
        delivery = webhooks.get_delivery(session=db.session, delivery_id=delivery_id)
        delivery = webhooks.replay_delivery(
            session=db.session,
            delivery=delivery,
            now=utcnow(),
            actor_id=current_principal().user_id,
        )
        db.session.commit()
        return delivery


@blp.route("/deliveries/purge")
class PurgeDeliveries(MethodView):
    @blp.auth(Role.ADMIN)
    @blp.arguments(PurgeIn)
    @blp.response(200, PurgeOut)
    def post(self, body: dict[str, Any]) -> dict[str, int]:
        """Purge settled webhook deliveries

        Deletes the deliveries with `status` (`delivered`, `dead` or `skipped`)
        settled before `before` (delivered, or last attempted, or else written),
        then the messages that no delivery
        needs any more; answers how
        many of each. Pending deliveries are never purged, nor a delivered
        `consent.requested` while another delivery of its message is not delivered
        (it shows the recipient was asked). What a purged question's deliveries
        said of its request (`not_reached`) is kept on the request. Recorded in
        the audit log. Admins only.
        """
        counts = webhooks.purge_deliveries(
            session=db.session,
            status=body["status"],
            before=body["before"],
            actor_id=current_principal().user_id,
            now=utcnow(),
        )
        db.session.commit()
        return counts


def _with_message(delivery: WebhookDelivery) -> dict[str, Any]:
    message = webhooks.message_of(session=db.session, delivery=delivery)
    return {name: getattr(delivery, name) for name in DeliveryOut().fields} | {
        "message": {
            "id": message.id,
            "delivery_id": delivery.delivery_id,
            "topic": message.topic,
            "created_at": message.created_at,
            "station_id": message.station_id,
            # Recipients' phones are masked: only auditors see them (DESIGN.md rule 7), and
            # deliveries are read by admins alone.
            "data": mask_phones_in_message(message.payload),
        }
    }
