"""py-spiffe WorkloadApiClient.fetch_x509_context() with default settings.

The socket comes from SPIFFE_ENDPOINT_SOCKET. Prints the default SVID's
SPIFFE ID and serial and the bundles' trust domains as one JSON line.
"""
from spiffe import WorkloadApiClient

from common import emit, serial_hex

with WorkloadApiClient() as client:
    context = client.fetch_x509_context(timeout=30)
    svid = context.default_svid
    emit(
        spiffe_id=str(svid.spiffe_id),
        serial=serial_hex(svid.leaf),
        svids=len(context.x509_svids),
        bundle_trust_domains=sorted(b.trust_domain.name for b in context.x509_bundle_set.bundles),
        bundle_authorities=sum(len(b.x509_authorities) for b in context.x509_bundle_set.bundles),
    )
