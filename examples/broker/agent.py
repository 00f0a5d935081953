"""An AI agent that reaches a CRM tool through Tessera's token broker.

It proves what it is with a JWT-SVID from the SPIFFE Workload API
(py-spiffe), and asks the broker, per request, for what it may do right now
(RFC 8693 token exchange at /token, with `scope` or RFC 9396
`authorization_details`), always within the task an operator started for it:

1. read one CRM account: allowed by policy, token in hand, the tool serves it;
2. delete that account: denied by policy (`no-crm-delete`);
3. write every account (a wildcard target, a high blast radius): held for
   an operator (`authorization_pending`); it polls with the request ID at
   the interval the broker gives until an operator approves or denies,
   the request expires or the task ends; when approved, it does the write;
4. once the task has ended (the operator ends it), it tries the tool again
   with the read token it still holds: refused.

Environment: SPIFFE_ENDPOINT_SOCKET (the agent's Workload API), BROKER_ISSUER
(https://127.0.0.1:8443), BROKER_CA (the PEM that signed the broker's
certificate), TOOL_URL (where the CRM tool listens), TASK (the task ID),
TASK_ENDED_FLAG (a file that appears when the operator has ended the task).
Prints one line per step, in plain words; exits non-zero if something is
not as the example expects.
"""
import json
import os
import sys
import time

import requests
from spiffe import SpiffeId, WorkloadApiClient

ISSUER = os.environ["BROKER_ISSUER"]
CA = os.environ["BROKER_CA"]
TOOL_URL = os.environ["TOOL_URL"]
TASK = os.environ["TASK"]
TASK_ENDED_FLAG = os.environ["TASK_ENDED_FLAG"]
CRM = "https://tools.example/crm"  # the tool's name: the tokens' audience
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
MAX_WAIT = float(os.environ.get("AGENT_MAX_WAIT", "120"))


def say(text):
    print(text, flush=True)


def give_up(text):
    say("UNEXPECTED: " + text)
    sys.exit(1)


# The SPIFFE ID asked for (the uid may hold more than one identity).
MY_ID = os.environ.get("AGENT_ID", "spiffe://example.org/agents/reporter")
workload_api = WorkloadApiClient()


def my_jwt_svid():
    """A fresh JWT-SVID for the broker (its issuer is the audience)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return workload_api.fetch_jwt_svid(audience={ISSUER}, subject=SpiffeId(MY_ID), timeout=10)
        except Exception as e:  # the agent may not have our entry yet
            if time.monotonic() > deadline:
                give_up(f"no JWT-SVID from the Workload API: {e}")
            time.sleep(0.5)


def exchange(**ask):
    """RFC 8693 token exchange: my JWT-SVID for an access token to the CRM."""
    form = {
        "grant_type": GRANT,
        "subject_token": my_jwt_svid().token,
        "subject_token_type": JWT_TYPE,
        "audience": CRM,
        "task": TASK,
    }
    form.update(ask)
    r = requests.post(ISSUER + "/token", data=form, verify=CA, timeout=10)
    return r.status_code, r.json()


def call_tool(method, path, token, body=None):
    r = requests.request(method, TOOL_URL + path, json=body, timeout=10,
                         headers={"Authorization": "Bearer " + token})
    try:
        answer = r.json()
    except ValueError:
        answer = {"error": r.text}
    return r.status_code, answer


svid = my_jwt_svid()
say(f"agent: I am {svid.spiffe_id} (JWT-SVID from the Workload API, audience {ISSUER}), working in task {TASK}")

# 1. Read one account: policy reporter-read-crm allows it.
account = f"{CRM}/accounts/acme"
read_details = json.dumps([{"type": "tool_access", "actions": ["read"], "locations": [account]}])
status, body = exchange(authorization_details=read_details)
if status != 200:
    give_up(f"the read was not granted: {status} {body}")
read_token = body["access_token"]
say(f"agent: GRANTED a token to read {account} (expires in {body['expires_in']} s)")
status, answer = call_tool("GET", "/accounts/acme", read_token)
if status != 200:
    give_up(f"the tool refused the read token: {status} {answer}")
say(f"agent: the CRM tool ACCEPTED the read token and answered: {json.dumps(answer['account'])}")

# 2. Delete it: policy no-crm-delete forbids it, whatever else permits.
delete_details = json.dumps([{"type": "tool_access", "actions": ["delete"], "locations": [account]}])
status, body = exchange(authorization_details=delete_details)
if status == 200 or body.get("error") != "access_denied":
    give_up(f"the delete was not denied: {status} {body}")
say(f"agent: DENIED a token to delete {account}: {body['error']}: {body.get('error_description', '')}")

# 3. Write every account: a wildcard target, blast radius above 20, held.
everything = f"{CRM}/accounts/*"
write_details = json.dumps([{"type": "tool_access", "actions": ["write"], "locations": [everything]}])
status, body = exchange(authorization_details=write_details)
if body.get("error") != "authorization_pending":
    give_up(f"the broad write was not held for approval: {status} {body}")
request_id, interval = body["request_id"], int(body.get("interval", 2))
say(f"agent: PENDING a token to write {everything}: the broker holds request {request_id} "
    f"for an operator; polling every {interval} s")

write_token = None
waited = 0.0
while write_token is None:
    if waited > MAX_WAIT:
        give_up(f"no answer to request {request_id} after {MAX_WAIT:.0f} s")
    time.sleep(interval)
    waited += interval
    status, body = exchange(authorization_details=write_details, request_id=request_id)
    error = body.get("error")
    if status == 200:
        write_token = body["access_token"]
        say(f"agent: APPROVED: request {request_id} answered, token to write {everything} received")
    elif error == "authorization_pending":
        continue
    elif error == "slow_down":
        interval += 5
    else:
        say(f"agent: NO TOKEN for request {request_id}: {error}: {body.get('error_description', '')}")
        break

if write_token is not None:
    status, answer = call_tool("PUT", "/accounts/*", write_token, {"set": {"segment": "enterprise"}})
    if status != 200:
        give_up(f"the tool refused the approved write token: {status} {answer}")
    say(f"agent: the CRM tool ACCEPTED the write token: {answer['result']}")

# 4. The task ends (the operator ends it): the tokens issued within it die with it.
say("agent: finished what I was allowed to do; waiting for the operator to end the task")
deadline = time.monotonic() + MAX_WAIT
while not os.path.exists(TASK_ENDED_FLAG):
    if time.monotonic() > deadline:
        give_up("the task was not ended")
    time.sleep(0.2)
status, answer = call_tool("GET", "/accounts/acme", read_token)
if status == 200:
    give_up(f"the tool still accepted the read token after the task ended: {answer}")
say(f"agent: after the task ended, the CRM tool REFUSED my old read token: {status} {answer.get('error_description', answer)}")
status, body = exchange(authorization_details=read_details)
if status == 200:
    give_up("the broker issued a token for an ended task")
say(f"agent: and the broker gives no new token for the ended task: {body['error']}: {body.get('error_description', '')}")
