#!/usr/bin/env bash
# The token broker example in one command: a Tessera server with a [broker],
# a node agent, an AI agent (agent.py) and a CRM tool (tool.py) that get
# their identities from the Workload API, a task, a denial, a request held
# for an operator and approved, and the tokens dying with the task.
# See README.md in this directory for what each step shows.
#
# Who is who: the two workloads run as you (their entries select your uid).
# The broker never lets a workload's own uid approve or deny its request,
# so your approval is refused (shown). Run as root (recommended), a second
# operator, uid EXAMPLE_OPERATOR_UID (default 4242, named in the server's
# admin_uids), approves it. Run as another user, there is no second
# operator: you end the task instead, and the held request gets no token.
#
# Environment (all optional):
#   EXAMPLE_BROKER_PORT   the broker's port (default 8443; fails if taken)
#   EXAMPLE_TOOL_PORT     the tool's port (default: a free one)
#   EXAMPLE_OPERATOR_UID  the approving operator's uid, as root (default 4242)
#   TESSERA_BIN_DIR       use tessera-server and tessera-agent from here, no build
#   TESSERA_PYTHON        a Python with tests/python/requirements.txt installed
#                         (default: target/py-venv/bin/python, created if missing)
#   EXAMPLE_KEEP=1        keep the temp dir (logs, data) afterwards
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

AGENT_ID="spiffe://example.org/agents/reporter"
TOOL_ID="spiffe://example.org/tools/crm"
NODE_ID="spiffe://example.org/node/example"
port="${EXAMPLE_BROKER_PORT:-8443}"

setup() { echo "setup: $*"; }
operator() { echo "operator: $*"; }
die() { echo "error: $*" >&2; exit 1; }

for tool in openssl; do
    command -v "$tool" >/dev/null || die "$tool is needed (apt-get install $tool)"
done
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port on 127.0.0.1 is taken; stop what listens there or set EXAMPLE_BROKER_PORT"
fi

# --- Who runs what ---
me="$(id -u)"
operator_uid=""
if [ "$me" = 0 ]; then
    command -v setpriv >/dev/null || die "setpriv (util-linux) is needed to act as a second operator"
    operator_uid="${EXAMPLE_OPERATOR_UID:-4242}"
    [ "$operator_uid" != 0 ] || die "EXAMPLE_OPERATOR_UID must not be the workloads' uid (0)"
fi

# --- Binaries ---
if [ -n "${TESSERA_BIN_DIR:-}" ]; then
    bin="$TESSERA_BIN_DIR"
else
    setup "building tessera-server and tessera-agent (cargo build)"
    (cd "$repo" && cargo build -q -p tessera-server -p tessera-agent --bins)
    bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
fi
server_bin="$bin/tessera-server"
agent_bin="$bin/tessera-agent"
[ -x "$server_bin" ] && [ -x "$agent_bin" ] || die "no tessera-server and tessera-agent in $bin"

# --- Python (as scripts/test.sh makes it) ---
if [ -n "${TESSERA_PYTHON:-}" ]; then
    py="$TESSERA_PYTHON"
else
    venv="$repo/target/py-venv"
    requirements="$repo/tests/python/requirements.txt"
    if ! cmp -s "$requirements" "$venv/requirements.installed" 2>/dev/null \
        || ! "$venv/bin/python" -c 'import spiffe, jwt, requests' 2>/dev/null; then
        setup "creating the Python venv $venv from tests/python/requirements.txt"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
        cp "$requirements" "$venv/requirements.installed"
    fi
    py="$venv/bin/python"
fi
"$py" -c 'import spiffe, jwt, requests' 2>/dev/null || die "$py lacks py-spiffe, PyJWT or requests"

# --- A temp dir for everything; stopped and removed on exit ---
work="$(mktemp -d -t tessera-broker-example.XXXXXX)"
chmod 755 "$work"   # the second operator reaches the admin socket in here
pids=()
cleanup() {
    status=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$status" != 0 ]; then
        for log in server.log agent-node.log tool.err agent.err; do
            [ -s "$work/$log" ] && { echo "--- $log (last lines)" >&2; tail -n 8 "$work/$log" >&2; }
        done
    fi
    if [ "${EXAMPLE_KEEP:-}" = 1 ]; then
        echo "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp -r "$here/policies" "$here/resources.toml" "$here/agent.py" "$here/tool.py" "$work/"
sed -e "s/127\.0\.0\.1:8443/127.0.0.1:$port/g" -e "s/^admin_uids = \[4242\]/admin_uids = [${operator_uid:-4242}]/" \
    "$here/server.toml" > "$work/server.toml"
issuer="https://127.0.0.1:$port"

# --- The broker's TLS: a CA and a leaf for 127.0.0.1 (operator certificate) ---
mkdir -p "$work/tls"
(
    cd "$work/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -keyout ca.key -out ca.pem -subj "/CN=Tessera broker example CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout broker.key -out broker.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
        "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" > leaf.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
        -extfile leaf.ext -out broker.pem 2>/dev/null
    chmod 644 ca.pem
)
setup "made a CA ($work/tls/ca.pem) and the broker's certificate for 127.0.0.1"

wait_for() { # SECONDS WHAT COMMAND...: runs COMMAND until it succeeds
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out waiting for $what"
        sleep 0.2
    done
}

# --- The server, with the [broker] section ---
(cd "$work" && exec "$server_bin" run --config server.toml) > "$work/server.log" 2>&1 &
pids+=($!)
wait_for 60 "the server (its log is below)" grep -q "tessera-server ready" "$work/server.log"
node_api="$(grep -o 'node_api=[0-9.:]*' "$work/server.log" | head -n 1 | cut -d= -f2)"
export TESSERA_ADMIN_SOCKET="$work/admin/admin.sock"
cli() { "$server_bin" "$@"; }
setup "server up: trust domain example.org, node API $node_api, broker $issuer"

# --- A node agent, attested with a join token ---
cli bundle show --format pem > "$work/bundle.pem"
cli token generate --spiffe-id "$NODE_ID" > "$work/join-token" 2>/dev/null
"$agent_bin" run --data-dir "$work/agent" --server-address "$node_api" \
    --join-token-file "$work/join-token" --trust-bundle "$work/bundle.pem" \
    --socket "$work/public/api.sock" > "$work/agent-node.log" 2>&1 &
pids+=($!)
wait_for 60 "the agent's Workload API socket" test -S "$work/public/api.sock"
export SPIFFE_ENDPOINT_SOCKET="unix://$work/public/api.sock"
setup "node agent $NODE_ID up, Workload API $SPIFFE_ENDPOINT_SOCKET"

# --- The two workloads' entries: the AI agent and the CRM tool, by uid ---
cli entry create --spiffe-id "$AGENT_ID" --parent-id "$NODE_ID" --selector "unix:uid:$me" >/dev/null
cli entry create --spiffe-id "$TOOL_ID" --parent-id "$NODE_ID" --selector "unix:uid:$me" >/dev/null
setup "entries: $AGENT_ID and $TOOL_ID, both for unix:uid:$me (you)"

# --- A task for the AI agent ---
task="$(cli task start --spiffe-id "$AGENT_ID" --ttl 10m --label ticket=OPS-1 --json \
    | "$py" -c 'import json, sys; print(json.load(sys.stdin)["id"])')"
operator "started task $task for $AGENT_ID (10 minutes, label ticket=OPS-1)"

# --- The CRM tool ---
tool_port="${EXAMPLE_TOOL_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
env BROKER_ISSUER="$issuer" BROKER_CA="$work/tls/ca.pem" TOOL_PORT="$tool_port" \
    SPIFFE_ENDPOINT_SOCKET="$SPIFFE_ENDPOINT_SOCKET" TOOL_ID="$TOOL_ID" \
    "$py" -u "$work/tool.py" 2> "$work/tool.err" &
pids+=($!)
tool_url="http://127.0.0.1:$tool_port"
wait_for 60 "the tool (its errors are below)" "$py" -c "import socket; socket.create_connection(('127.0.0.1', $tool_port), 1)"

# --- The AI agent, in the background: it will wait for an operator ---
env BROKER_ISSUER="$issuer" BROKER_CA="$work/tls/ca.pem" TOOL_URL="$tool_url" \
    TASK="$task" TASK_ENDED_FLAG="$work/task-ended" AGENT_ID="$AGENT_ID" \
    SPIFFE_ENDPOINT_SOCKET="$SPIFFE_ENDPOINT_SOCKET" \
    "$py" -u "$work/agent.py" > >(tee "$work/agent.out") 2> "$work/agent.err" &
agent_pid=$!
pids+=("$agent_pid")

# --- The operator answers the held request ---
pending_id() {
    cli request list --json | "$py" -c '
import json, sys
print(next((r["id"] for r in json.load(sys.stdin) if r["state"] == "pending"), ""))'
}
request=""
deadline=$((SECONDS + 60))
while [ -z "$request" ]; do
    kill -0 "$agent_pid" 2>/dev/null || die "agent.py ended before asking for approval (its errors are below)"
    [ "$SECONDS" -lt "$deadline" ] || die "no request was held for approval"
    sleep 0.3
    request="$(pending_id)"
done
operator "request $request is waiting for me:"
cli request show --id "$request" | sed 's/^/operator:   /'
if refused="$(cli request approve --id "$request" --reason "self-approval" 2>&1)"; then
    die "the broker let the workload's own uid approve its request: $refused"
fi
operator "my approval as uid $me is REFUSED, as it must be: $me is the workload's own uid (${refused#error: })"
if [ -n "$operator_uid" ]; then
    # The second operator runs the CLI as its own uid; it must reach the binary.
    cli_b="$server_bin"
    if ! setpriv "--reuid=$operator_uid" "--regid=$operator_uid" --clear-groups "$cli_b" --version >/dev/null 2>&1; then
        mkdir -p "$work/bin" && cp "$server_bin" "$work/bin/" && chmod 755 "$work/bin" && cli_b="$work/bin/tessera-server"
    fi
    approved="$(setpriv "--reuid=$operator_uid" "--regid=$operator_uid" --clear-groups \
        "$cli_b" request approve --id "$request" --reason "OPS-1: segment update reviewed")"
    operator "APPROVED by the second operator, uid $operator_uid: $approved"
    # The agent polls, gets its token and does the write; then it waits for the task to end.
    deadline=$((SECONDS + 60))
    until grep -q "waiting for the operator to end the task" "$work/agent.out"; do
        kill -0 "$agent_pid" 2>/dev/null || die "agent.py ended before its write (its errors are below)"
        [ "$SECONDS" -lt "$deadline" ] || die "the agent did not finish its write"
        sleep 0.2
    done
else
    operator "(not root: no second operator to approve; run as root to see that. I end the task instead.)"
fi

# --- The task ends: every token issued under it is revoked ---
cli task end --id "$task" --reason "report finished" >/dev/null
operator "ended task $task: every token issued under it is inactive from now on"
touch "$work/task-ended"
agent_status=0
wait "$agent_pid" || agent_status=$?
[ "$agent_status" = 0 ] || die "agent.py failed (exit $agent_status; see $work/agent.err)"

# --- One event stream: every broker decision on record ---
operator "the broker's decisions in the event stream:"
cli events --json --kind broker | "$py" -c "$(cat <<'PY'
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    a = e.get("attrs") or {}
    parts = [f"#{e['seq']}", e["kind"], e.get("decision", "")]
    if e.get("operator"):
        parts.append(f"by uid {e['operator']['uid']}")
    parts += [f"{k}={a[k]}" for k in ("task", "actions", "targets", "blast_radius", "policies") if k in a]
    if e.get("reason"):
        parts.append(f"reason={e['reason']!r}")
    print("operator:   " + " ".join(p for p in parts if p))
PY
)"
operator "$(cli events verify)"
echo "done: stopping the tool, the agent and the server"
