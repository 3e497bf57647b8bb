"""Builders for every ext_proc answer the picker sends (one shared, immutable set per server)."""

from __future__ import annotations

import json

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

__all__ = ["DESTINATION_HEADER", "LB_NAMESPACE", "MAX_STREAMED_CHUNK", "Responses"]

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
#: Envoy's limit for one streamed_response body chunk (the GAIE EPP uses the same bound).
MAX_STREAMED_CHUNK = 62_000

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class Responses:
    """Builders for every answer this server sends."""

    def __init__(self) -> None:
        self.headers_continue = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
        self.body_continue = ep.ProcessingResponse(request_body=ep.BodyResponse())
        self.trailers_continue = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
        self.resp_headers_continue = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        self.resp_body_continue = ep.ProcessingResponse(response_body=ep.BodyResponse())
        self.resp_trailers_continue = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())

    @staticmethod
    def _common(endpoint: str) -> ep.CommonResponse:
        return ep.CommonResponse(
            header_mutation=ep.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=endpoint.encode()),
                        append_action=_OVERWRITE,
                    )
                ]
            ),
            clear_route_cache=True,
        )

    @staticmethod
    def _metadata(endpoint: str) -> struct_pb2.Struct:
        meta = struct_pb2.Struct()
        meta.update({LB_NAMESPACE: {DESTINATION_HEADER: endpoint}})
        return meta

    def pick_headers(self, endpoint: str) -> ep.ProcessingResponse:
        return ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(response=self._common(endpoint)),
            dynamic_metadata=self._metadata(endpoint),
        )

    def pick_body(self, endpoint: str) -> ep.ProcessingResponse:
        return ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=self._common(endpoint)),
            dynamic_metadata=self._metadata(endpoint),
        )

    def pick_trailers(self, endpoint: str) -> ep.ProcessingResponse:
        # Trailers cannot carry request-header mutations: only the metadata route remains.
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse(), dynamic_metadata=self._metadata(endpoint))

    @staticmethod
    def immediate(status: int, message: str) -> ep.ProcessingResponse:
        body = json.dumps({"error": {"message": message, "type": "routing_error", "code": status}})
        return ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=status),
                headers=ep.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                            append_action=_OVERWRITE,
                        )
                    ]
                ),
                body=body.encode(),
                details=f"kvindex_extproc_{status}",
            )
        )

    @staticmethod
    def streamed(
        body: bytes | bytearray, end_of_stream: bool, *, response: bool = False
    ) -> list[ep.ProcessingResponse]:
        """``body`` as streamed_response body mutations of at most MAX_STREAMED_CHUNK bytes."""
        view = memoryview(body)
        pieces = [bytes(view[i : i + MAX_STREAMED_CHUNK]) for i in range(0, len(view), MAX_STREAMED_CHUNK)] or [b""]
        out = []
        for i, piece in enumerate(pieces):
            mutation = ep.BodyMutation(
                streamed_response=ep.StreamedBodyResponse(
                    body=piece, end_of_stream=end_of_stream and i == len(pieces) - 1
                )
            )
            br = ep.BodyResponse(response=ep.CommonResponse(body_mutation=mutation))
            out.append(ep.ProcessingResponse(response_body=br) if response else ep.ProcessingResponse(request_body=br))
        return out
