"""The sandbox's ``hubspot`` mode: the HubSpot wire format :class:`HubSpotConnector` speaks,
served on the date-versioned paths (``/crm/objects/2026-03/...``, ``/automation/sequences/
2026-03/...``, ``/crm/lists/2026-03/...``; any ``YYYY-MM`` version is accepted) and on the
legacy ones (``/crm/v3/...``, ``/automation/v4/sequences/...``).

Served (HubSpot's documented shapes, trimmed to what cohortflow reads):

- ``POST .../contacts/batch/upsert`` ``{"inputs": [{"idProperty", "id", "properties",
  "objectWriteTraceId"?}]}``: 1 to 100 inputs, repeated ids refuse the whole batch (400).
  200 with ``results``, or 207 with ``errors`` whose ``context`` names the failed input's
  ``objectWriteTraceId`` (its ``ids`` without one).
- ``POST .../contacts/batch/read`` ``{"idProperty", "inputs": [{"id"}], "properties"}``: 207
  with an ``OBJECT_NOT_FOUND`` error listing the ids it lacks.
- ``GET .../contacts/{id}?idProperty=&properties=``: 404 ``OBJECT_NOT_FOUND`` when absent.
- ``POST /automation/sequences/{v}/enrollments?userId=`` ``{"contactId", "sequenceId",
  "senderEmail"}``; ``GET .../enrollments/contact/{contactId}`` (the active enrolment, 404
  when none).
- ``PUT /crm/lists/{v}/{listId}/memberships/add`` and ``/remove`` with a JSON array of record
  ids: ``{"recordsIdsAdded"}`` (HubSpot's spelling) or ``{"recordIdsRemoved"}``, and
  ``{"recordIdsMissing"}``; empty lists are left out, as HubSpot does.
- ``GET /crm/lists/{v}/records/{objectTypeId}/{recordId}/memberships`` (paged by ``after``).

Not HubSpot: ``POST /automation/sequences/{v}/enrollments/unenroll`` ``{"contactId",
"sequenceId"}``. HubSpot documents no unenrolment endpoint (2026-03, v4); this stands in for
whatever a deployment points ``HubSpotConnector(sequence_unenroll_path=...)`` at.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from cohortflow.crm.sandbox.hubspot_store import (
    AlreadyEnrolledPolicy,
    HsAlreadyEnrolled,
    HsContact,
    HsNotFound,
    HsUpsert,
    HubSpotStore,
)

MAX_BATCH = 100
MAX_LIST_RECORDS = 100_000
_VERSION = re.compile(r"^\d{4}-\d{2}(-beta)?$")
_CATEGORY_BY_STATUS = {
    400: "VALIDATION_ERROR",
    404: "OBJECT_NOT_FOUND",
    409: "CONFLICT",
    422: "VALIDATION_ERROR",
}

# (date-versioned prefix, legacy prefix) per API family.
OBJECTS = ("/crm/objects/{version}", "/crm/v3/objects")
SEQUENCES = ("/automation/sequences/{version}", "/automation/v4/sequences")
LISTS = ("/crm/lists/{version}", "/crm/v3/lists")


class HubSpotError(Exception):
    """An error answered in HubSpot's error shape."""

    def __init__(
        self,
        status: int,
        category: str,
        message: str,
        *,
        sub_category: str | None = None,
        errors: Sequence[dict[str, Any]] = (),
    ) -> None:
        super().__init__(status, category, message)
        self.status = status
        self.category = category
        self.message = message
        self.sub_category = sub_category
        self.errors = list(errors)


def error_body(
    category: str,
    message: str,
    *,
    sub_category: str | None = None,
    errors: Sequence[dict[str, Any]] = (),
    **extra: Any,
) -> dict[str, Any]:
    """HubSpot's error object."""
    body: dict[str, Any] = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
    }
    if sub_category:
        body["subCategory"] = sub_category
    if errors:
        body["errors"] = list(errors)
    body.update(extra)
    return body


def error_response(error: HubSpotError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error_body(
            error.category, error.message, sub_category=error.sub_category, errors=error.errors
        ),
        status_code=error.status,
        headers=headers,
    )


@dataclass(frozen=True)
class RecordRejection:
    """An injected refusal of one record of a batch."""

    status: int
    message: str


@dataclass
class HubSpotBackend:
    """What the routes need from the sandbox: its store, its enrolment policy, and the
    injected per-record refusals (``reject(value)`` consumes one for that id, if any)."""

    store: Callable[[], HubSpotStore]
    already_enrolled: AlreadyEnrolledPolicy
    reject: Callable[[str], RecordRejection | None]


class _UpsertInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    idProperty: str = Field(min_length=1)
    properties: dict[str, str] = Field(default_factory=dict)
    objectWriteTraceId: str | None = None


class _UpsertBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[_UpsertInput] = Field(min_length=1, max_length=MAX_BATCH)


class _ReadInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)


class _BatchRead(BaseModel):
    model_config = ConfigDict(extra="ignore")

    idProperty: str | None = None
    inputs: list[_ReadInput] = Field(min_length=1, max_length=MAX_BATCH)
    properties: list[str] = Field(default_factory=list)


class _GdprDelete(BaseModel):
    model_config = ConfigDict(extra="ignore")

    objectId: str = Field(min_length=1)
    idProperty: str | None = None


class _Enrollment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    contactId: str = Field(min_length=1)
    sequenceId: str = Field(min_length=1)
    senderEmail: str = Field(min_length=1)
    senderAliasAddress: str | None = None


class _Unenrollment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    contactId: str = Field(min_length=1)
    sequenceId: str = Field(min_length=1)


def hubspot_routes(backend: HubSpotBackend) -> APIRouter:
    """Every ``hubspot`` mode route, on both path styles."""
    router = APIRouter()

    async def upsert(request: Request, batch: _UpsertBatch) -> JSONResponse:
        _check_version(request)
        seen: set[tuple[str, str]] = set()
        repeated = []
        for item in batch.inputs:
            if (item.idProperty, item.id) in seen:
                repeated.append(item.id)
            seen.add((item.idProperty, item.id))
        if repeated:
            raise HubSpotError(
                400,
                "VALIDATION_ERROR",
                f"Duplicate IDs found in batch input: {repeated}. IDs must be unique",
            )
        errors: list[dict[str, Any]] = []
        rejected: set[int] = set()
        for index, item in enumerate(batch.inputs):
            refusal = backend.reject(item.id)
            if refusal is None:
                continue
            rejected.add(index)
            context = (
                {"objectWriteTraceId": [item.objectWriteTraceId]}
                if item.objectWriteTraceId
                else {"ids": [item.id]}
            )
            errors.append(
                error_body(
                    _CATEGORY_BY_STATUS.get(refusal.status, "VALIDATION_ERROR"),
                    refusal.message,
                    errors=[{"message": refusal.message, "in": f"inputs[{index}]"}],
                    context=context,
                )
            )
        inputs = [HsUpsert(i.idProperty, i.id, i.properties) for i in batch.inputs]
        contacts = await asyncio.to_thread(backend.store().upsert, inputs, rejected)
        results = []
        for item, contact in zip(batch.inputs, contacts, strict=True):
            if contact is None:
                continue
            result = _record(contact, None)
            result["new"] = contact.new
            if item.objectWriteTraceId:
                result["objectWriteTraceId"] = item.objectWriteTraceId
            results.append(result)
        return _batch_response(results, errors)

    async def batch_read(request: Request, body: _BatchRead) -> JSONResponse:
        _check_version(request)
        store = backend.store()
        wanted = [*body.properties, *([body.idProperty] if body.idProperty else [])]
        results = []
        missing = []
        for item in body.inputs:
            contact = await asyncio.to_thread(store.find, body.idProperty, item.id)
            if contact is None:
                missing.append(item.id)
            else:
                results.append(_record(contact, wanted))
        errors = []
        if missing:
            errors.append(
                error_body(
                    "OBJECT_NOT_FOUND",
                    "Could not get some CONTACT objects, they may be deleted or not exist."
                    " Check that ids are valid.",
                    context={"ids": missing},
                )
            )
        return _batch_response(results, errors)

    async def gdpr_delete(request: Request, body: _GdprDelete) -> Response:
        _check_version(request)
        found = await asyncio.to_thread(backend.store().gdpr_delete, body.idProperty, body.objectId)
        if not found:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", "Object not found.")
        return Response(status_code=204)

    async def get_contact(
        request: Request,
        contact_id: str,
        id_property: Annotated[str | None, Query(alias="idProperty")] = None,
    ) -> JSONResponse:
        _check_version(request)
        contact = await asyncio.to_thread(backend.store().find, id_property, contact_id)
        if contact is None:
            raise HubSpotError(
                404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric."
            )
        wanted = [
            name
            for value in request.query_params.getlist("properties")
            for name in value.split(",")
            if name
        ]
        return JSONResponse(_record(contact, wanted or None))

    async def enroll(
        request: Request,
        body: _Enrollment,
        user_id: Annotated[str | None, Query(alias="userId")] = None,
    ) -> JSONResponse:
        _check_version(request)
        if not user_id:
            raise HubSpotError(400, "VALIDATION_ERROR", "userId is a required query parameter")
        try:
            enrolment = await asyncio.to_thread(
                backend.store().enroll,
                body.contactId,
                body.sequenceId,
                body.senderEmail,
                user_id,
                backend.already_enrolled,
            )
        except HsNotFound as exc:
            raise HubSpotError(
                404, "OBJECT_NOT_FOUND", f"No contact with id {body.contactId}"
            ) from exc
        except HsAlreadyEnrolled as exc:
            message = (
                f"Contact {body.contactId} is already enrolled in sequence {exc.sequence_id}."
                " Contacts can only be enrolled in one sequence at a time."
            )
            raise HubSpotError(
                400,
                "VALIDATION_ERROR",
                message,
                errors=[{"message": message, "code": "ALREADY_ENROLLED"}],
            ) from exc
        return JSONResponse(
            {
                "id": str(enrolment.id),
                "enrolledAt": enrolment.enrolled_at,
                "toEmail": enrolment.to_email,
                "updatedAt": enrolment.enrolled_at,
            }
        )

    async def enrollment(request: Request, contact_id: str) -> JSONResponse:
        _check_version(request)
        active = await asyncio.to_thread(backend.store().active_enrollment, contact_id)
        if active is None:
            raise HubSpotError(
                404, "OBJECT_NOT_FOUND", f"No active sequence enrollment for contact {contact_id}"
            )
        return JSONResponse(
            {
                "id": str(active.id),
                "sequenceId": active.sequence_id,
                "sequenceName": f"Sequence {active.sequence_id}",
                "enrolledAt": active.enrolled_at,
                "enrolledBy": active.user_id,
                "enrolledByEmail": active.sender_email,
                "toEmail": active.to_email,
                "updatedAt": active.enrolled_at,
            }
        )

    async def unenroll(request: Request, body: _Unenrollment) -> JSONResponse:
        _check_version(request)
        ended = await asyncio.to_thread(backend.store().unenroll, body.contactId, body.sequenceId)
        return JSONResponse({"unenrolled": ended})

    async def list_add(
        request: Request, list_id: str, record_ids: Annotated[list[str | int], Body()]
    ) -> JSONResponse:
        _check_version(request)
        ids = _record_ids(record_ids)
        added, missing = await asyncio.to_thread(backend.store().add_to_list, list_id, ids)
        return JSONResponse(_non_empty(recordsIdsAdded=added, recordIdsMissing=missing))

    async def list_remove(
        request: Request, list_id: str, record_ids: Annotated[list[str | int], Body()]
    ) -> JSONResponse:
        _check_version(request)
        ids = _record_ids(record_ids)
        removed, missing = await asyncio.to_thread(backend.store().remove_from_list, list_id, ids)
        return JSONResponse(_non_empty(recordIdsRemoved=removed, recordIdsMissing=missing))

    async def record_lists(
        request: Request,
        object_type: str,
        record_id: str,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=250)] = 100,
    ) -> JSONResponse:
        _check_version(request)
        if object_type not in ("0-1", "contacts", "contact"):
            raise HubSpotError(400, "VALIDATION_ERROR", f"Unknown objectTypeId {object_type}")
        lists = await asyncio.to_thread(backend.store().lists_of, record_id)
        if lists is None:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", f"No record with id {record_id}")
        start = int(after) if after and after.isdigit() else 0
        page = lists[start : start + limit]
        body: dict[str, Any] = {
            "results": [
                {
                    "listId": m.list_id,
                    "listVersion": 1,
                    "firstAddedTimestamp": m.first_added_at,
                    "lastAddedTimestamp": m.last_added_at,
                    "isPublicList": False,
                }
                for m in page
            ],
            "total": len(lists),
        }
        if start + limit < len(lists):
            body["paging"] = {"next": {"after": str(start + limit)}}
        return JSONResponse(body)

    for prefix in OBJECTS:
        router.add_api_route(f"{prefix}/contacts/batch/upsert", upsert, methods=["POST"])
        router.add_api_route(f"{prefix}/contacts/batch/read", batch_read, methods=["POST"])
        router.add_api_route(f"{prefix}/contacts/{{contact_id}}", get_contact, methods=["GET"])
        router.add_api_route(f"{prefix}/contacts/gdpr-delete", gdpr_delete, methods=["POST"])
    for prefix in SEQUENCES:
        router.add_api_route(f"{prefix}/enrollments", enroll, methods=["POST"])
        router.add_api_route(
            f"{prefix}/enrollments/contact/{{contact_id}}", enrollment, methods=["GET"]
        )
        router.add_api_route(f"{prefix}/enrollments/unenroll", unenroll, methods=["POST"])
    for prefix in LISTS:
        router.add_api_route(f"{prefix}/{{list_id}}/memberships/add", list_add, methods=["PUT"])
        router.add_api_route(
            f"{prefix}/{{list_id}}/memberships/remove", list_remove, methods=["PUT"]
        )
        router.add_api_route(
            f"{prefix}/records/{{object_type}}/{{record_id}}/memberships",
            record_lists,
            methods=["GET"],
        )
    return router


def _check_version(request: Request) -> None:
    version = request.path_params.get("version")
    if version is not None and not _VERSION.match(str(version)):
        raise HubSpotError(404, "OBJECT_NOT_FOUND", f"Unknown API version {version!r}")


def _record(contact: HsContact, wanted: Sequence[str] | None) -> dict[str, Any]:
    properties: dict[str, str | None]
    if wanted is None:
        properties = dict(contact.properties)
    else:
        properties = {name: contact.properties.get(name) for name in wanted}
        properties["hs_object_id"] = str(contact.id)
    properties.setdefault("createdate", contact.created_at)
    properties.setdefault("lastmodifieddate", contact.updated_at)
    return {
        "id": str(contact.id),
        "properties": properties,
        "createdAt": contact.created_at,
        "updatedAt": contact.updated_at,
        "archived": False,
    }


def _batch_response(results: list[dict[str, Any]], errors: list[dict[str, Any]]) -> JSONResponse:
    body: dict[str, Any] = {"status": "COMPLETE", "results": results}
    if errors:
        body["numErrors"] = len(errors)
        body["errors"] = errors
    return JSONResponse(body, status_code=207 if errors else 200)


def _record_ids(values: Sequence[str | int]) -> list[str]:
    if len(values) > MAX_LIST_RECORDS:
        raise HubSpotError(400, "VALIDATION_ERROR", f"at most {MAX_LIST_RECORDS} record ids")
    return [str(v) for v in values]


def _non_empty(**lists: list[str]) -> dict[str, list[str]]:
    return {name: values for name, values in lists.items() if values}
