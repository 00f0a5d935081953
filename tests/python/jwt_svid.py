"""py-spiffe's JWT-SVID calls with default settings.

fetch_jwt_svid, fetch_jwt_bundles, validate_jwt_svid (through the agent)
and JwtSvid.parse_and_validate (offline, with the fetched bundle), then the
same two validations for an audience the token is not for. Prints one JSON
line. The socket comes from SPIFFE_ENDPOINT_SOCKET.
"""
from spiffe import JwtSvid, WorkloadApiClient

from common import emit


def error_name(call):
    try:
        call()
    except Exception as err:  # the test asserts which error it was
        return type(err).__name__
    return None


with WorkloadApiClient() as client:
    svid = client.fetch_jwt_svid(audience={"api"}, timeout=30)
    again = client.fetch_jwt_svid(audience={"api"}, timeout=30)
    bundles = client.fetch_jwt_bundles(timeout=30)
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    parsed = JwtSvid.parse_and_validate(svid.token, bundle, {"api"})
    validated = client.validate_jwt_svid(svid.token, "api")
    emit(
        spiffe_id=str(svid.spiffe_id),
        token=svid.token,
        same_token_again=again.token == svid.token,
        audience=sorted(svid.audience),
        bundle_trust_domains=sorted(b.trust_domain.name for b in bundles.bundles),
        bundle_keys=len(bundle.jwt_authorities),
        parsed_spiffe_id=str(parsed.spiffe_id),
        validated_spiffe_id=str(validated.spiffe_id),
        wrong_audience_validate=error_name(lambda: client.validate_jwt_svid(svid.token, "other")),
        wrong_audience_parse=error_name(lambda: JwtSvid.parse_and_validate(svid.token, bundle, {"other"})),
        no_identity_subject=error_name(
            lambda: client.fetch_jwt_svid(audience={"api"}, subject=svid.spiffe_id.__class__("spiffe://example.org/not-mine"), timeout=30)
        ),
    )
