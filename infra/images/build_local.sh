#!/usr/bin/env bash
# `make images-local`: build every CPU image on this machine with no container registry.
#   1. Docker: installs Debian's docker.io (+ docker-compose, debootstrap) when missing and starts dockerd when no
#      engine answers (root, or sudo). Idempotent: a running engine is used as it is.
#   2. A base image: `debootstrap --variant=minbase bookworm` imported as $LOCAL_BASE (once; ~30 s).
#   3. torch's CPU wheel: copied from pip's find-links directories (PIP_FIND_LINKS, /opt/wheels) into build/wheels,
#      which the Dockerfile mounts as a find-links directory, so no image build downloads the CUDA build.
#   4. The images, with Debian's client and BuildKit (`docker build`, no buildx), host networking, pip's cache as a
#      BuildKit cache mount (kept between builds), and the host's CA bundle as a build secret when there is one:
#        train-cpu serve-cpu gateway chat-ui mlflow   (Dockerfile, mlflow/Dockerfile)
#        postgres s3                                  (the compose stack's stores; infra/compose/*/Dockerfile)
#      tagged $REGISTRY/tulpar-<name>:$IMAGE_TAG, the names the charts and infra/compose use.
# Usage: infra/images/build_local.sh [name ...]   (default: all of them)
#        infra/images/build_local.sh --engine     only step 1; exit 3 when no engine can be started here
# Exit codes: 0 built, 2 a build failed or a bad name (the message names the log), 3 no Docker engine.
# Settings (environment): REGISTRY, IMAGE_TAG, LOCAL_BASE, TORCH_VERSION, DOCKER (client), TIMINGS (a file that
# gets one "name seconds size_bytes" line per image).
set -euo pipefail
cd "$(dirname "$0")/../.."

REGISTRY=${REGISTRY:-ghcr.io/tulpar-ai}
IMAGE_TAG=${IMAGE_TAG:-0.1.0}
LOCAL_BASE=${LOCAL_BASE:-tulpar-base:bookworm}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DOCKER=${DOCKER:-/usr/bin/docker}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ALL=(train-cpu serve-cpu gateway chat-ui mlflow postgres s3)
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
no_engine() { printf 'error: %s\n' "$*" >&2; exit 3; }

engine_up() { $SUDO "$DOCKER" info >/dev/null 2>&1; }

ensure_docker() {
  if [ ! -x "$DOCKER" ] || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
     || ! command -v docker-compose >/dev/null; then
    command -v apt-get >/dev/null || no_engine "no Docker client at $DOCKER and no apt-get to install docker.io: install Docker, then set DOCKER=<client>"
    say "installing Debian's docker.io, docker-compose and debootstrap"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap >/dev/null \
      || no_engine "apt-get install docker.io docker-compose debootstrap failed"
  fi
  if engine_up; then return; fi
  say "starting dockerd (log: build/dockerd.log)"
  mkdir -p build
  # setsid: the engine outlives this script and its terminal; it is a system service, stopped with `pkill dockerd`.
  $SUDO setsid dockerd >build/dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 60); do engine_up && return; sleep 1; done
  no_engine "dockerd did not answer within 60 s: see build/dockerd.log"
}

ensure_base() {
  if $SUDO "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then return; fi
  local root
  root=$(mktemp -d /var/tmp/tulpar-rootfs.XXXXXX)
  say "creating $LOCAL_BASE with debootstrap (minbase bookworm from $DEBIAN_MIRROR)"
  $SUDO debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >build/debootstrap.log 2>&1 \
    || die "debootstrap failed: see build/debootstrap.log"
  $SUDO tar -C "$root" -c . | $SUDO "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  $SUDO rm -rf "$root"
}

stage_wheels() {
  mkdir -p build/wheels
  local dir wheel
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    for wheel in "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do
      [ -f "$wheel" ] || continue
      [ -f "build/wheels/$(basename "$wheel")" ] || cp "$wheel" build/wheels/
      return
    done
  done
  say "no local torch $TORCH_VERSION CPU wheel: images take it from https://download.pytorch.org/whl/cpu"
  TORCH_INDEX=https://download.pytorch.org/whl/cpu
}

build() {
  local name=$1 tag="$REGISTRY/tulpar-$1:$IMAGE_TAG" file=infra/images/Dockerfile target="" args=()
  local common=(--build-arg "TORCH_VERSION=$TORCH_VERSION" --build-arg "TORCH_INDEX=${TORCH_INDEX:-}")
  local py=(--build-arg "BUILDER_BASE=$LOCAL_BASE" --build-arg "RUNTIME_BASE=$LOCAL_BASE" --build-arg PYTHON_SOURCE=system)
  case $name in
    train-cpu) target=ray; args=("${py[@]}" "${common[@]}") ;;
    serve-cpu) target=ray; args=("${py[@]}" "${common[@]}" --build-arg EXTRAS=cpu) ;;
    gateway) target=web; args=("${py[@]}" "${common[@]}" --build-arg MODULE=services.gateway --build-arg PORT=8080) ;;
    chat-ui) target=web; args=("${py[@]}" "${common[@]}" --build-arg EXTRAS=ui --build-arg MODULE=services.chat_ui
                               --build-arg PORT=8501 --build-arg HEALTH_PATH=/_stcore/health) ;;
    mlflow) file=infra/images/mlflow/Dockerfile; args=(--build-arg "BASE=$LOCAL_BASE") ;;
    postgres | s3) file=infra/compose/$name/Dockerfile; args=(--build-arg "BASE=$LOCAL_BASE") ;;
    *) die "unknown image '$name': choose from ${ALL[*]}" ;;
  esac
  local secret=()
  local ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
  [ -n "$ca" ] && [ -s "$ca" ] && secret=(--secret "id=ca,src=$ca")
  say "building $tag"
  local started=$SECONDS
  DOCKER_BUILDKIT=1 $SUDO "$DOCKER" build --network host -f "$file" ${target:+--target "$target"} "${args[@]}" \
    "${secret[@]}" --build-arg "VERSION=$IMAGE_TAG" --build-arg "GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "$tag" . >"build/image-$name.log" 2>&1 || { tail -30 "build/image-$name.log" >&2; die "building $name failed: see build/image-$name.log"; }
  local seconds=$((SECONDS - started)) size
  size=$($SUDO "$DOCKER" image inspect -f '{{.Size}}' "$tag")
  say "$tag: ${seconds}s, $((size / 1000000)) MB"
  [ -z "${TIMINGS:-}" ] || echo "$name $seconds $size" >>"$TIMINGS"
}

mkdir -p build
if [ "${1:-}" = --engine ]; then
  ensure_docker
  exit 0
fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ALL[@]}")
ensure_docker
ensure_base
stage_wheels
for n in "${names[@]}"; do build "$n"; done
