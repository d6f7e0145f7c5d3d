"""Server reflection (grpc.reflection.v1alpha) that answers with the
contract's own file descriptors, comments and all, so `grpcurl describe`
shows each field's units and limits.

grpc_reflection answers from a DescriptorPool, and a pool keeps no comments
(FileDescriptor.CopyToProto drops source_code_info); so this servicer finds
symbols in a pool but sends the FileDescriptorProtos as the image holds them.
The image is read at start: a rebuilt image is served by the next start.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ledger.v1 import ledger_pb2

log = logging.getLogger(__name__)

IMAGE = "ledger.v1.binpb"
SERVICE_NAME: str = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


def image_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The image's files, imports first (as buf writes them); [] without it."""
    try:
        data = resources.files(__package__).joinpath(IMAGE).read_bytes()
    except OSError:
        return []
    return list(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def generated_files(*files: descriptor.FileDescriptor) -> list[descriptor_pb2.FileDescriptorProto]:
    """`files` and their imports, imports first, from the generated code
    (no comments: the generated code has none)."""
    out: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in out:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        out[file.name] = proto

    for file in files:
        add(file)
    return list(out.values())


def _drop_default_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """Clears json_name where it is the default lowerCamelCase, as in the
    generated descriptors reflection served before: grpcurl prints the field
    names (idempotency_key) then, as the README shows, not lowerCamelCase
    (idempotencyKey); an explicit json_name option stays."""
    for message in messages:
        for field in message.field:
            if field.json_name == _camel(field.name):
                field.ClearField("json_name")
        _drop_default_json_names(message.nested_type)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class ContractReflection(reflection_pb2_grpc.ServerReflectionServicer):  # type: ignore[misc]
    """`files` must come imports first; of two files of one name the first wins."""

    def __init__(
        self, service_names: Iterable[str], files: Sequence[descriptor_pb2.FileDescriptorProto]
    ) -> None:
        self._services = sorted(service_names)
        self._pool = descriptor_pool.DescriptorPool()
        self._serialized: dict[str, bytes] = {}
        for file in files:
            if file.name not in self._serialized:
                self._pool.Add(file)
                self._serialized[file.name] = file.SerializeToString()

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for request in requests:
            yield self.answer(request)

    def answer(
        self, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse:
        response = reflection_pb2.ServerReflectionResponse(original_request=request)
        pool = self._pool
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    reflection_pb2.ServiceResponse(name=name) for name in self._services
                )
            elif kind == "file_by_filename":
                self._add_files(response, pool.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                symbol = request.file_containing_symbol
                self._add_files(response, pool.FindFileContainingSymbol(symbol))
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                message = pool.FindMessageTypeByName(wanted.containing_type)
                extension = pool.FindExtensionByNumber(message, wanted.extension_number)
                self._add_files(response, pool.FindFileContainingSymbol(extension.full_name))
            elif kind == "all_extension_numbers_of_type":
                message = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = response.all_extension_numbers_response
                numbers.base_type_name = message.full_name
                numbers.extension_number.extend(
                    sorted(e.number for e in pool.FindAllExtensions(message))
                )
            else:
                return _error(request, grpc.StatusCode.INVALID_ARGUMENT)
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND)
        return response

    def _add_files(
        self, response: reflection_pb2.ServerReflectionResponse, file: descriptor.FileDescriptor
    ) -> None:
        """The file, then every file it imports, transitively."""
        names: dict[str, None] = {}
        pending = [file]
        while pending:
            current = pending.pop()
            if current.name not in names:
                names[current.name] = None
                pending.extend(current.dependencies)
        response.file_descriptor_response.file_descriptor_proto.extend(
            self._serialized[name] for name in names
        )


def _error(
    request: reflection_pb2.ServerReflectionRequest, code: grpc.StatusCode
) -> reflection_pb2.ServerReflectionResponse:
    value, name = code.value
    return reflection_pb2.ServerReflectionResponse(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=value, error_message=name),
    )


def served_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The contract from the image; health, reflection and the error details
    (so that clients can show an ErrorInfo) from their generated code."""
    files = image_files()
    for file in files:
        _drop_default_json_names(file.message_type)
    if not any(f.name == ledger_pb2.DESCRIPTOR.name for f in files):
        # An install without the image still serves the contract, uncommented.
        log.warning("%s not found: reflection serves the contract without its comments", IMAGE)
        files = []
    generated = (
        ledger_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
        error_details_pb2.DESCRIPTOR,
        status_pb2.DESCRIPTOR,
        code_pb2.DESCRIPTOR,
    )
    return files + generated_files(*generated)


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serves reflection for `service_names` (their files: served_files())."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ContractReflection(service_names, served_files()), server
    )
