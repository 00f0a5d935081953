"""A tiny CRM tool that trusts Tessera's token broker, and nothing else.

It serves `GET /accounts/<name>` (action `read`) and `PUT /accounts/<name>`
(action `write`; `/accounts/*` writes them all) on plain HTTP, for the
example only. For every request it:

1. takes the bearer access token and validates it with PyJWT against the
   broker's keys, found through the broker's discovery document
   (/.well-known/openid-configuration -> jwks_uri): header `typ` must be
   `at+jwt` (RFC 9068: a JWT-SVID or an ID token cannot pass as an access
   token), signature, `iss` = the broker, `aud` = this tool
   (https://tools.example/crm), `exp` in the future;
2. checks that the token grants the operation: the action in `scope`
   (covering the whole tool) or an `authorization_details` entry with the
   action and a location covering the target (`.../accounts/*` covers every
   account);
3. introspects the token at the broker (RFC 7662), authenticating with its
   own JWT-SVID from the Workload API as `Authorization: Bearer`: a token
   whose task has ended, or that was revoked, is refused at once, well
   before its `exp`.

Environment: SPIFFE_ENDPOINT_SOCKET, BROKER_ISSUER, BROKER_CA, TOOL_PORT.
Logs one line per decision.
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import requests
from spiffe import SpiffeId, WorkloadApiClient

ISSUER = os.environ["BROKER_ISSUER"]
CA = os.environ["BROKER_CA"]
PORT = int(os.environ["TOOL_PORT"])
ME = "https://tools.example/crm"  # this tool's name: the audience its tokens must carry

ACCOUNTS = {"acme": {"name": "Acme Corp", "segment": "mid-market", "owner": "team-sales"},
            "globex": {"name": "Globex", "segment": "smb", "owner": "team-sales"}}

# The SPIFFE ID asked for (the uid may hold more than one identity).
MY_ID = os.environ.get("TOOL_ID", "spiffe://example.org/tools/crm")
workload_api = WorkloadApiClient()
discovery = requests.get(ISSUER + "/.well-known/openid-configuration", verify=CA, timeout=10).json()
if discovery["issuer"] != ISSUER:
    sys.exit(f"tool: the discovery document names issuer {discovery['issuer']}, not {ISSUER}")
jwks = {}


def log(text):
    print("tool: " + text, flush=True)


def signing_key(kid):
    """The broker key `kid`, fetching the JWKS again for a key not seen yet (rotation)."""
    global jwks
    if kid not in jwks:
        keys = requests.get(discovery["jwks_uri"], verify=CA, timeout=10).json()["keys"]
        jwks = {k["kid"]: jwt.PyJWK(k) for k in keys}
    if kid not in jwks:
        raise jwt.InvalidTokenError(f"no broker key {kid}")
    return jwks[kid]


def validate(token):
    header = jwt.get_unverified_header(token)
    if header.get("typ") != "at+jwt":
        raise jwt.InvalidTokenError(f"typ is {header.get('typ')!r}, not at+jwt")
    key = signing_key(header.get("kid"))
    return jwt.decode(token, key.key, algorithms=[key.algorithm_name], audience=ME, issuer=ISSUER,
                      options={"require": ["exp", "iss", "aud", "sub", "jti"]})


def covers(location, target):
    return location == target or (location.endswith("/*") and target.startswith(location[:-1]))


def grants(claims, action, target):
    if action in claims.get("scope", "").split():
        return True
    return any(action in d.get("actions", []) and any(covers(loc, target) for loc in d.get("locations", []))
               for d in claims.get("authorization_details", []))


def my_jwt_svid():
    deadline = time.monotonic() + 30
    while True:
        try:
            return workload_api.fetch_jwt_svid(audience={ISSUER}, subject=SpiffeId(MY_ID), timeout=10)
        except Exception:  # the agent may not have our entry yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def introspect(token):
    r = requests.post(ISSUER + "/introspect", data={"token": token, "token_type_hint": "access_token"},
                      headers={"Authorization": "Bearer " + my_jwt_svid().token}, verify=CA, timeout=10)
    r.raise_for_status()
    return r.json()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status == 401:
            error = body.get("error", "invalid_token")
            self.send_header("WWW-Authenticate", f'Bearer error="{error}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refuse(self, status, error, why):
        log(f"{self.command} {self.path}: REFUSED ({why})")
        self.answer(status, {"error": error, "error_description": why})

    def handle_request(self, action):
        name = self.path.removeprefix("/accounts/")
        if not self.path.startswith("/accounts/") or not name or "/" in name:
            return self.answer(404, {"error": "not_found"})
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return self.refuse(401, "invalid_token", "no bearer token")
        token = auth.removeprefix("Bearer ")
        try:
            claims = validate(token)
        except jwt.InvalidTokenError as e:
            return self.refuse(401, "invalid_token", f"the token does not validate: {e}")
        target = f"{ME}/accounts/{name}"
        if not grants(claims, action, target):
            return self.refuse(403, "insufficient_scope", f"the token does not grant {action} on {target}")
        seen = introspect(token)
        if not seen.get("active"):
            return self.refuse(401, "invalid_token", "the broker says the token is no longer active (its task ended, or it was revoked)")
        who = f"{claims['sub']} in task {claims.get('task', '?')}"
        if action == "read":
            if name not in ACCOUNTS:
                return self.answer(404, {"error": "no such account"})
            log(f"GET {self.path}: ACCEPTED read for {who} (valid at+jwt, active at the broker)")
            return self.answer(200, {"account": {"id": name, **ACCOUNTS[name]}})
        length = int(self.headers.get("Content-Length", "0") or 0)
        change = json.loads(self.rfile.read(length) or b"{}").get("set", {})
        names = list(ACCOUNTS) if name == "*" else [name]
        for n in names:
            ACCOUNTS.setdefault(n, {}).update({k: str(v) for k, v in change.items()})
        log(f"PUT {self.path}: ACCEPTED write for {who} (valid at+jwt, active at the broker)")
        return self.answer(200, {"result": f"updated {len(names)} accounts with {json.dumps(change)}"})

    def do_GET(self):
        self.handle_request("read")

    def do_PUT(self):
        self.handle_request("write")


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
log(f"I am {my_jwt_svid().spiffe_id} (JWT-SVID from the Workload API, for introspection)")
log(f"listening on http://127.0.0.1:{PORT} as {ME}; trusts tokens from {ISSUER} (keys via {discovery['jwks_uri']})")
server.serve_forever()
