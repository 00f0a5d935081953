"""An AI agent and a tool against Tessera's token broker, with independent clients.

The agent (spiffe://example.org/agents/reporter) gets its JWT-SVID and
X509-SVID from the agent's Workload API with py-spiffe, and talks to the
broker with plain `requests`: token exchange (RFC 8693) with its JWT-SVID
as subject_token and with its X509-SVID on mutual TLS, a denial, a request
held for approval that an operator approves with the CLI, a poll whose
content changed, and the end of its task. The tool
(spiffe://example.org/tools/crm) validates access tokens with PyJWT and
the JWKS it finds through the discovery document, and introspects them
with its own JWT-SVID. PyJWT also verifies a JWT-SVID through the OIDC
discovery document for JWT-SVIDs. Bad input closes the run.

Prints one JSON line per step; exits non-zero (with the step) on the first
thing that is not as it must be. Run by tests/tests/broker.rs.
"""
import base64
import json
import os
import subprocess
import tempfile
import time

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import SpiffeId, WorkloadApiClient

from common import emit, fail

ISSUER = os.environ["BROKER_ISSUER"]
CA = os.environ["BROKER_CA"]
CLI = os.environ["TESSERA_CLI"]
ADMIN = os.environ["TESSERA_ADMIN_SOCKET"]
AGENT = "spiffe://example.org/agents/reporter"
TOOL_ID = "spiffe://example.org/tools/crm"
CRM = "https://tools.example/crm"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"

client = WorkloadApiClient()


def check(step, ok, detail):
    if not ok:
        fail(f"{step}: {detail}")


APPROVER = int(os.environ["TESSERA_APPROVER_UID"])


def cli(*args, uid=None):
    """The operator CLI; as `uid` (another operator) when given."""
    extra = {"user": uid, "group": uid} if uid is not None else {}
    out = subprocess.run([CLI, *args, "--socket", ADMIN], capture_output=True, text=True, timeout=30, **extra)
    return out.returncode, out.stdout.strip(), out.stderr.strip()


def svid_for(audience, subject=AGENT):
    return client.fetch_jwt_svid(audience={audience}, subject=SpiffeId(subject), timeout=30).token


def post(path, data, cert=None, headers=None):
    r = requests.post(ISSUER + path, data=data, verify=CA, cert=cert, headers=headers, timeout=10)
    return r.status_code, r.json()


def exchange(**fields):
    data = {"grant_type": GRANT, "subject_token_type": JWT_TYPE, "audience": CRM}
    data.update(fields)
    return post("/token", data)


def details(actions, locations):
    return json.dumps([{"type": "tool_access", "actions": actions, "locations": locations}])


# --- The tool: discovery, JWKS, PyJWT, introspection with its own SVID ---
meta = requests.get(ISSUER + "/.well-known/oauth-authorization-server", verify=CA, timeout=10).json()
oidc = requests.get(ISSUER + "/.well-known/openid-configuration", verify=CA, timeout=10).json()
check("metadata", meta["issuer"] == ISSUER and oidc["issuer"] == ISSUER, meta)
check("metadata", GRANT in meta["grant_types_supported"], meta)
jwks = requests.get(oidc["jwks_uri"], verify=CA, timeout=10).json()


def tool_validates(token):
    header = jwt.get_unverified_header(token)
    if header.get("typ") != "at+jwt":
        raise ValueError(f"typ {header.get('typ')}")
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    return jwt.decode(token, jwt.PyJWK(key).key, algorithms=["ES256"], audience=CRM, issuer=ISSUER)


def tool_introspects(token):
    bearer = svid_for(ISSUER, subject=TOOL_ID)
    return post("/introspect", {"token": token}, headers={"Authorization": "Bearer " + bearer})


emit(step="discovery", token_endpoint=meta["token_endpoint"], keys=len(jwks["keys"]))

# --- A task for the agent, started by an operator ---
code, out, err = cli("task", "start", "--spiffe-id", AGENT, "--ttl", "600", "--label", "ticket=OPS-1", "--json")
check("task start", code == 0, err)
task = json.loads(out)["id"]
emit(step="task", task=task)

# --- Allowed: read the CRM, JWT-SVID as subject_token ---
status, body = exchange(subject_token=svid_for(ISSUER), scope="read", task=task)
check("read", status == 200, body)
read_token = body["access_token"]
claims = tool_validates(read_token)
check("read claims", claims["sub"] == AGENT and claims["task"] == task and claims["scope"] == "read", claims)
status, seen = tool_introspects(read_token)
check("introspect", status == 200 and seen["active"] is True and seen["sub"] == AGENT, seen)
emit(step="read", expires_in=body["expires_in"], claims=claims, introspection=seen)

# --- Allowed over mutual TLS with the X509-SVID, no subject_token ---
x509 = next(s for s in client.fetch_x509_svids(timeout=30) if str(s.spiffe_id) == AGENT)
tmp = tempfile.mkdtemp()
chain, keyfile = os.path.join(tmp, "svid.pem"), os.path.join(tmp, "svid.key")
with open(chain, "wb") as f:
    for c in x509.cert_chain:
        f.write(c.public_bytes(serialization.Encoding.PEM))
with open(keyfile, "wb") as f:
    f.write(x509.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
status, body = post("/token", {"grant_type": GRANT, "audience": CRM, "scope": "list", "task": task}, cert=(chain, keyfile))
check("mtls", status == 200, body)
check("mtls claims", tool_validates(body["access_token"])["sub"] == AGENT, body)
emit(step="mtls", ok=True)

# --- A sub-task the agent starts for itself; a token under it; one token revoked ---
status, body = post("/task", {"subject_token": svid_for(ISSUER), "subject_token_type": JWT_TYPE, "parent": task, "ttl": "60"})
check("sub-task", status == 200 and body["parent"] == task and body["expires_in"] <= 60, body)
sub_task = body["task"]
status, body = exchange(subject_token=svid_for(ISSUER), scope="read", task=sub_task)
check("token under sub-task", status == 200, body)
sub_token = body["access_token"]
status, body = post("/task", {"subject_token": svid_for(ISSUER, subject=TOOL_ID), "subject_token_type": JWT_TYPE, "parent": task})
check("sub-task of another's task", status == 400 and body["error"] == "invalid_grant", body)
status, body = exchange(subject_token=svid_for(ISSUER), scope="read", task=task)
revoked_jti = tool_validates(body["access_token"])["jti"]
code, out, err = cli("task", "revoke-token", "--jti", revoked_jti, "--reason", "leaked")
check("revoke token", code == 0, err)
status, seen = tool_introspects(body["access_token"])
check("revoked token inactive", seen == {"active": False}, seen)
status, seen = tool_introspects(read_token)
check("other tokens stay active", seen["active"] is True, seen)
emit(step="sub_task", task=sub_task)

# --- Denied by policy ---
status, body = exchange(subject_token=svid_for(ISSUER), scope="delete", task=task)
check("deny", status == 400 and body["error"] == "access_denied" and "no-crm-delete" in body["error_description"], body)
emit(step="deny", error=body["error"], description=body["error_description"])

# --- Held for approval: a broad write ---
broad = details(["write"], ["https://tools.example/crm/accounts/*"])
status, body = exchange(subject_token=svid_for(ISSUER), authorization_details=broad, task=task)
check("pending", status == 400 and body["error"] == "authorization_pending" and body["interval"] >= 1, body)
request_id = body["request_id"]
status, again = exchange(subject_token=svid_for(ISSUER), authorization_details=broad, task=task, request_id=request_id)
check("slow down", again["error"] == "slow_down" and again["interval"] == body["interval"] + 5, again)
time.sleep(again["interval"] + 0.3)
status, again = exchange(subject_token=svid_for(ISSUER), authorization_details=broad, task=task, request_id=request_id)
check("still pending", again["error"] == "authorization_pending" and again["request_id"] == request_id, again)
code, out, err = cli("request", "show", "--id", request_id, "--json")
check("request show", code == 0, err)
shown = json.loads(out)
emit(step="pending", request_id=request_id, shown=shown)

# A poll whose content changed is refused, before and after approval.
changed = details(["write"], ["https://tools.example/crm/contracts/*"])
status, body = exchange(subject_token=svid_for(ISSUER), authorization_details=changed, task=task, request_id=request_id)
check("changed", status == 400 and body["error"] == "invalid_request" and "changed" in body["error_description"], body)

# The workload's own uid (its entry's unix:uid selector) may not approve it.
code, out, err = cli("request", "approve", "--id", request_id, "--reason", "self-approval")
check("own uid refused", code != 0 and "own uid" in err and len(err.splitlines()) == 1, (code, out, err))
time.sleep(6.3)
status, again = exchange(subject_token=svid_for(ISSUER), authorization_details=broad, task=task, request_id=request_id)
check("still pending after a refused approval", again["error"] == "authorization_pending", again)
code, out, err = cli("request", "approve", "--id", request_id, "--reason", "OPS-1 bulk update", uid=APPROVER)
check("approve", code == 0, err)
status, body = exchange(subject_token=svid_for(ISSUER), authorization_details=changed, task=task, request_id=request_id)
check("changed after approval", status == 400 and body["error"] == "invalid_request", body)
status, body = exchange(subject_token=svid_for(ISSUER), authorization_details=broad, task=task, request_id=request_id)
check("approved", status == 200, body)
write_token = body["access_token"]
write_claims = tool_validates(write_token)
check("approved claims", write_claims["authorization_details"] == json.loads(broad), write_claims)
status, body = exchange(subject_token=svid_for(ISSUER), authorization_details=broad, task=task, request_id=request_id)
check("approval used once", status == 400 and body["error"] == "invalid_grant", body)
emit(step="approved", claims=write_claims)

# --- The task ends: every token issued under it is inactive at once ---
code, out, err = cli("task", "end", "--id", task, "--reason", "done")
check("task end", code == 0, err)
ended = time.monotonic()
status, r1 = tool_introspects(read_token)
status, r2 = tool_introspects(write_token)
status, r3 = tool_introspects(sub_token)
check("inactive after task end", r1 == r2 == r3 == {"active": False}, (r1, r2, r3))
seen_after_ms = (time.monotonic() - ended) * 1000
status, body = exchange(subject_token=svid_for(ISSUER), scope="read", task=task)
check("no token after task end", status == 400 and body["error"] == "invalid_grant", body)
emit(step="task_end", inactive_within_ms=round(seen_after_ms, 1))

# --- A JWT-SVID verified through the OIDC discovery document for JWT-SVIDs ---
svid_issuer = ISSUER + "/svid"
disc = requests.get(svid_issuer + "/.well-known/openid-configuration", verify=CA, timeout=10).json()
check("svid discovery", disc["issuer"] == svid_issuer, disc)
svid_jwks = requests.get(disc["jwks_uri"], verify=CA, timeout=10).json()
token = svid_for("vault")
kid = jwt.get_unverified_header(token)["kid"]
key = jwt.PyJWK(next(k for k in svid_jwks["keys"] if k["kid"] == kid)).key
svid_claims = jwt.decode(token, key, algorithms=disc["id_token_signing_alg_values_supported"], audience="vault", issuer=svid_issuer)
check("svid claims", svid_claims["sub"] == AGENT, svid_claims)
emit(step="jwt_svid_oidc", claims=svid_claims)

# --- Bad input ---
code, out, err = cli("task", "start", "--spiffe-id", AGENT, "--ttl", "600", "--json")
task2 = json.loads(out)["id"]
bad = {}
r = requests.post(ISSUER + "/token", data="a=" + "x" * 100_000, verify=CA, timeout=10,
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
bad["oversized"] = (r.status_code, r.json()["error"])
r = requests.post(ISSUER + "/token", json={"grant_type": GRANT}, verify=CA, timeout=10)
bad["json_body"] = (r.status_code, r.json()["error"])
bad["unknown_grant"] = post("/token", {"grant_type": "password", "username": "u"})
bad["no_credential"] = exchange(scope="read", task=task2)
bad["bad_details"] = exchange(subject_token=svid_for(ISSUER), authorization_details="[{", task=task2)
bad["unknown_details_type"] = exchange(subject_token=svid_for(ISSUER), authorization_details=json.dumps([{"type": "other", "actions": ["read"]}]), task=task2)
bad["wrong_audience"] = exchange(subject_token=svid_for("not-the-broker"), scope="read", task=task2)
bad["two_tools"] = exchange(subject_token=svid_for(ISSUER), scope="read", task=task2, resource="https://other.example")
bad["other_workloads_task"] = exchange(subject_token=svid_for(ISSUER, subject=TOOL_ID), scope="read", task=task2)
# A token from a foreign trust domain (its own key).
foreign_key = ec.generate_private_key(ec.SECP256R1())
foreign = jwt.encode({"sub": "spiffe://evil.example/agent", "aud": ISSUER, "exp": int(time.time()) + 300, "jti": "x"},
                     foreign_key, algorithm="ES256", headers={"kid": "evil"})
bad["foreign"] = exchange(subject_token=foreign, scope="read", task=task2)
# Revoked and expired JWT-SVIDs, minted by the operator.
code, out, err = cli("jwt", "mint", "--spiffe-id", AGENT, "--audience", ISSUER, "--json")
check("mint", code == 0, err)
minted = json.loads(out)
code, out, err = cli("svid", "revoke", "--jti", minted["jti"], "--reason", "test")
check("revoke", code == 0, err)
bad["revoked"] = exchange(subject_token=minted["token"], scope="read", task=task2)
code, out, err = cli("jwt", "mint", "--spiffe-id", AGENT, "--audience", ISSUER, "--ttl", "1", "--json")
short = json.loads(out)["token"]
time.sleep(2.1)
bad["expired"] = exchange(subject_token=short, scope="read", task=task2)
bad["introspect_anonymous"] = post("/introspect", {"token": "x"})
bad = {k: [v[0], v[1]["error"] if isinstance(v[1], dict) else v[1], (v[1].get("error_description", "") if isinstance(v[1], dict) else "")] for k, v in bad.items()}
emit(step="bad_input", results=bad)
