from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.pagination import keyset_page
from courier_api.api.users.schemas import UserCreate, UserListArgs, UserOut, UserPage, UserUpdate
from courier_api.auth import current_principal, ensure_visible
from courier_api.extensions import db
from models import Role, User
from sync import directory

blp = ApiBlueprint("users", __name__, url_prefix="/api/v1/users", description="Users")
READERS = (Role.ADMIN, Role.STATION_MANAGER, Role.AUDITOR)


@blp.route("")
class Users(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.arguments(UserListArgs, location="query")
    @blp.response(200, UserPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List users

        Managers see the users of their own station whatever `station_id` says.
        """
        station_id = current_principal().station_filter(args.get("station_id"))
        users = directory.list_users(
            session=db.session,
            station_id=station_id,
            role=args.get("role"),
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page(users, args["limit"], key=lambda u: u.id)

    @blp.auth(Role.ADMIN)
    @blp.arguments(UserCreate)
    @blp.response(201, UserOut)
    @blp.alt_response(409, response="CONFLICT")
    @blp.alt_response(404, response="NOT_FOUND")
    def post(self, body: dict[str, Any]) -> User:
        """Create a user (admin)

        Couriers and station managers belong to a station; auditors, admins and
        integrations do not. The account is on the audit log (`user_created`).
        """
        station_id = body.pop("station_id", None)
        station = (
            directory.get_station(session=db.session, station_id=station_id)
            if station_id is not None
            else None
        )
        user = directory.create_user(
            session=db.session,
            station=station,
            created_by=current_principal().user_id,
            password_hash_method=current_app.config["PASSWORD_HASH_METHOD"],
            **body,
        )
        db.session.commit()
        return user


@blp.route("/<id:user_id>")
class UserById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.response(200, UserOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, user_id: int) -> User:
        """Get a user

        Managers read their station's users; any other (of another station, or
        of none: admins, auditors, integrations) answers what an unknown id
        answers (404 `user_not_found`), so that it does not show it exists.
        """
        user = directory.get_user(session=db.session, user_id=user_id)
        ensure_visible(user.station_id, directory.user_not_found(user_id))
        return user

    @blp.auth(Role.ADMIN)
    @blp.arguments(UserUpdate)
    @blp.response(200, UserOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def patch(self, body: dict[str, Any], user_id: int) -> User:
        """Change a user's name, password, or disable the account (admin)

        A disabled account's tokens stop working at once. The change is on the
        audit log (`user_updated`: each field from and to; a password set is noted as
        `password_changed`, never its hash); a PATCH that changes nothing writes none.
        """
        user = directory.get_user(session=db.session, user_id=user_id)
        directory.update_user(
            session=db.session,
            user=user,
            changed_by=current_principal().user_id,
            password_hash_method=current_app.config["PASSWORD_HASH_METHOD"],
            **body,
        )
        db.session.commit()
        return user
