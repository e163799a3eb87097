#!/usr/bin/env bash
# The compose stack (infra/compose/docker-compose.yaml) with its settings and secrets:
#   stack.sh up [--serve]     start (or update) the stack and wait until every service is healthy; --serve adds the
#                             serving app for $SERVE_MODEL (profile `serve`), which must be registered already
#   stack.sh down [--volumes] stop and remove the containers (the volumes stay unless --volumes)
#   stack.sh ps | logs [service] | env
# Settings: infra/compose/defaults.env, overridden by the environment; STACK_PROJECT names the compose project
# (default tulpar: its containers and volumes are tulpar_*). Secrets: build/compose/secrets.env, generated
# on first use (mode 600): POSTGRES_PASSWORD, S3_ACCESS_KEY, S3_SECRET_KEY, TULPAR_API_KEY (the key clients use;
# the gateway only sees TULPAR_API_KEY_HASH). TULPAR_DATA (the corpora, mounted read-only into the Ray nodes)
# defaults to ../shared/data beside the checkout. Needs the images of `make images-local` and a running Docker
# (make images-local starts it).
set -euo pipefail
cd "$(dirname "$0")/../.."

DOCKER=${DOCKER:-/usr/bin/docker}
COMPOSE=${COMPOSE:-docker-compose}
SECRETS=build/compose/secrets.env
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

die() { printf 'error: %s\n' "$*" >&2; exit 2; }

load_settings() {
  local line key
  while IFS= read -r line; do
    [[ $line =~ ^([A-Z_][A-Z0-9_]*)= ]] || continue
    key=${BASH_REMATCH[1]}
    [ -n "${!key:-}" ] || export "${line?}"
  done <infra/compose/defaults.env
  if [ ! -s "$SECRETS" ]; then
    mkdir -p "$(dirname "$SECRETS")"
    local key_value tmp
    key_value="tlp-stack-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
    tmp=$(mktemp "$SECRETS.XXXXXX")
    chmod 600 "$tmp"
    {
      echo "POSTGRES_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
      echo "S3_ACCESS_KEY=tulpar$(python3 -c 'import secrets; print(secrets.token_hex(6))')"
      echo "S3_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(20))')"
      echo "TULPAR_API_KEY=$key_value"
      echo "TULPAR_API_KEY_HASH=sha256:$(printf '%s' "$key_value" | sha256sum | cut -d' ' -f1)"
    } >"$tmp"
    mv "$tmp" "$SECRETS"
  fi
  set -a
  # shellcheck disable=SC1090
  . "$SECRETS"
  set +a
  if [ -z "${TULPAR_DATA:-}" ]; then
    TULPAR_DATA=$(cd .. && pwd)/shared/data
    export TULPAR_DATA
  fi
  [ -d "$TULPAR_DATA" ] || die "TULPAR_DATA=$TULPAR_DATA is not a directory: set TULPAR_DATA to the corpora"
}

compose() { $SUDO env "PATH=$PATH" "$COMPOSE" -p "${STACK_PROJECT:-tulpar}" -f infra/compose/docker-compose.yaml "$@"; }

# Every started container of the project healthy (or running, for those without a health check), within $1 s.
wait_healthy() {
  local deadline=$((SECONDS + $1)) bad
  while :; do
    bad=""
    local id state health name
    for id in $(compose ps -q); do
      read -r name state health < <($SUDO "$DOCKER" inspect -f \
        '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
      if [ "$state" != running ] || { [ "$health" != healthy ] && [ "$health" != none ]; }; then
        bad="$bad ${name#/}($state/$health)"
      fi
    done
    [ -z "$bad" ] && return 0
    [ $SECONDS -lt $deadline ] || die "not healthy after $1 s:$bad (see: infra/compose/stack.sh logs)"
    sleep 2
  done
}

cmd=${1:-}
shift || true
load_settings
case $cmd in
  up)
    $SUDO "$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers: run make images-local first"
    profile=()
    [ "${1:-}" = --serve ] && profile=(--profile serve)
    compose "${profile[@]}" up -d --remove-orphans
    wait_healthy "${STACK_WAIT_S:-600}"
    echo "stack up: MLflow http://127.0.0.1:$MLFLOW_PORT  Ray dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT" \
      " gateway http://127.0.0.1:$GATEWAY_PORT/v1  chat UI http://127.0.0.1:$CHAT_UI_PORT  (API key: $SECRETS)"
    ;;
  down)
    volumes=()
    [ "${1:-}" = --volumes ] && volumes=(--volumes)
    compose --profile serve down "${volumes[@]}"
    ;;
  ps) compose --profile serve ps ;;
  logs) compose --profile serve logs --tail=200 "$@" ;;
  env) env | grep -E '^(REGISTRY|IMAGE_TAG|SERVE_MODEL|TULPAR_DATA|[A-Z_]+_PORT)=' | sort ;;
  *) die "usage: infra/compose/stack.sh up [--serve] | down [--volumes] | ps | logs [service] | env" ;;
esac
