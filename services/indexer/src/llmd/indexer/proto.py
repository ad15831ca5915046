"""llm-d's `indexer.v1.IndexerService` (api/indexerpb/indexer.proto), built at import time.

The messages keep llm-d's names and field numbers, so its clients work unchanged; llmd adds
fields at numbers llm-d does not use: `token_ids`/`cache_salt` on the request (score already
tokenized prompts) and `matched_blocks`/`total_blocks` on each pod score. No generated code:
the descriptor is declared here and the classes come from protobuf's message factory.

    service IndexerService { rpc GetPodScores(GetPodScoresRequest) returns (GetPodScoresResponse); }
    message GetPodScoresRequest { string prompt = 1; string model_name = 2;
        repeated string pod_identifiers = 3; repeated uint32 token_ids = 10;
        string cache_salt = 11; }
    message GetPodScoresResponse { repeated PodScore scores = 1; }
    message PodScore { string pod = 1; double score = 2; optional int32 data_parallel_rank = 3;
        int64 matched_blocks = 10; int64 total_blocks = 11; }
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "indexer.v1"
SERVICE = f"{PACKAGE}.IndexerService"
METHOD = f"/{SERVICE}/GetPodScores"

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="llmd/indexer/indexer.proto", package=PACKAGE, syntax="proto3"
    )

    def msg(name: str, fields: list[tuple[str, int, int, int]]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if ftype == _F.TYPE_MESSAGE:
                fd.type_name = f".{PACKAGE}.PodScore"

    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    msg(
        "GetPodScoresRequest",
        [
            ("prompt", 1, _F.TYPE_STRING, opt),
            ("model_name", 2, _F.TYPE_STRING, opt),
            ("pod_identifiers", 3, _F.TYPE_STRING, rep),
            ("token_ids", 10, _F.TYPE_UINT32, rep),
            ("cache_salt", 11, _F.TYPE_STRING, opt),
        ],
    )
    msg(
        "PodScore",
        [
            ("pod", 1, _F.TYPE_STRING, opt),
            ("score", 2, _F.TYPE_DOUBLE, opt),
            ("data_parallel_rank", 3, _F.TYPE_INT32, opt),
            ("matched_blocks", 10, _F.TYPE_INT64, opt),
            ("total_blocks", 11, _F.TYPE_INT64, opt),
        ],
    )
    # proto3 `optional` is a synthetic oneof
    ps = f.message_type[1]
    ps.oneof_decl.add(name="_data_parallel_rank")
    ps.field[2].oneof_index = 0
    ps.field[2].proto3_optional = True
    msg("GetPodScoresResponse", [("scores", 1, _F.TYPE_MESSAGE, rep)])
    svc = f.service.add(name="IndexerService")
    svc.method.add(
        name="GetPodScores",
        input_type=f".{PACKAGE}.GetPodScoresRequest",
        output_type=f".{PACKAGE}.GetPodScoresResponse",
    )
    return f


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file())


def _cls(name: str) -> Any:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


GetPodScoresRequest: Any = _cls("GetPodScoresRequest")
GetPodScoresResponse: Any = _cls("GetPodScoresResponse")
PodScore: Any = _cls("PodScore")
