"""Server reflection serves the contract with its comments: what grpcurl
describes is what protos/ledger.v1.binpb documents, field by field."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from ledger_service.contract import reflection
from ledger_service.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "protos" / "ledger.v1.binpb"
GRPCURL = Path(sys.executable).parent / "grpcurl"
# FileDescriptorProto.message_type, DescriptorProto.field (descriptor.proto).
MESSAGE_TYPE, FIELD = 4, 2


def field_comments(message: str) -> dict[str, str]:
    """field name -> the first line of its leading comment, from the image."""
    image = descriptor_pb2.FileDescriptorSet.FromString(IMAGE.read_bytes())
    (file,) = [f for f in image.file if f.name == "ledger/v1/ledger.proto"]
    (index,) = [i for i, m in enumerate(file.message_type) if m.name == message]
    fields = file.message_type[index].field
    comments = {}
    for location in file.source_code_info.location:
        path = list(location.path)
        if len(path) == 4 and path[:3] == [MESSAGE_TYPE, index, FIELD]:
            first = location.leading_comments.strip().splitlines()
            if first:
                comments[fields[path[3]].name] = first[0].strip()
    return comments


def test_the_package_serves_the_committed_image() -> None:
    packaged = resources.files("ledger_service.contract").joinpath("ledger.v1.binpb")
    assert packaged.read_bytes() == IMAGE.read_bytes()


def test_grpcurl_describe_shows_every_field_comment(sqlite_url: str) -> None:
    if not GRPCURL.exists():
        pytest.skip(f"{GRPCURL} not installed (make venv)")
    comments = field_comments("PostEntryRequest")
    assert {"ledger", "idempotency_key", "amount"} <= comments.keys()
    with ServerProcess(sqlite_url) as server:
        result = subprocess.run(
            [str(GRPCURL), "-plaintext", server.address, "describe", "ledger.v1.PostEntryRequest"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    for name, comment in comments.items():
        assert f"// {comment}" in result.stdout, (name, result.stdout)


def test_reflection_answers_with_the_image_and_resolves_error_details() -> None:
    served = reflection.ContractReflection(["ledger.v1.LedgerService"], reflection.served_files())

    def answer(**request: str) -> reflection_pb2.ServerReflectionResponse:
        return served.answer(reflection_pb2.ServerReflectionRequest(**request))

    def files(symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
        raw = answer(file_containing_symbol=symbol).file_descriptor_response
        return [descriptor_pb2.FileDescriptorProto.FromString(f) for f in raw.file_descriptor_proto]

    contract = files("ledger.v1.PostEntryRequest")
    assert [f.name for f in contract] == [
        "ledger/v1/ledger.proto",
        "google/protobuf/timestamp.proto",
    ]
    assert contract[0].source_code_info.location  # the comments came along
    # What clients need to show an error's details.
    assert files("google.rpc.ErrorInfo")[0].name == "google/rpc/error_details.proto"
    missing = answer(file_containing_symbol="no.Such").error_response
    assert missing.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    listed = answer(list_services="*").list_services_response
    assert [s.name for s in listed.service] == ["ledger.v1.LedgerService"]
