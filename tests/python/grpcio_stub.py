"""A plain grpcio stub with default channel options on the Workload API.

Calls /SpiffeWorkloadAPI/FetchX509SVID with the security header and prints
the first response's SPIFFE IDs, then calls it without the header and
prints the status code it gets.
"""
import os

import grpc
from spiffe._proto import workload_pb2

from common import emit

endpoint = os.environ["SPIFFE_ENDPOINT_SOCKET"]  # unix:///abs/path
channel = grpc.insecure_channel(endpoint)
fetch = channel.unary_stream(
    "/SpiffeWorkloadAPI/FetchX509SVID",
    request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
    response_deserializer=workload_pb2.X509SVIDResponse.FromString,
)
stream = fetch(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=30)
first = next(stream)
stream.cancel()
try:
    next(fetch(workload_pb2.X509SVIDRequest(), timeout=30))
    refused = "OK"
except grpc.RpcError as error:
    refused = error.code().name
emit(
    spiffe_ids=[svid.spiffe_id for svid in first.svids],
    chain_bytes=len(first.svids[0].x509_svid) if first.svids else 0,
    without_header=refused,
)
channel.close()
