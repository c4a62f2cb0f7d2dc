# shellcheck shell=bash
# Loads the deployment settings; sourced by deploy/run, deploy/ctl, deploy/reload-workers
# and deploy/bin/program. Precedence: the environment > $CHAT_CONFIG > deploy/cluster.env.
# Afterwards every CHAT_* setting is exported, with paths made absolute, and
#   CHAT_ROOT        the repository
#   CHAT_SUPERVISOR  the directory of the supervisor programs (supervisord, supervisorctl)

CHAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

chat_die() {
  echo "deploy: $*" >&2
  exit 2
}

chat_load_config() {
  local saved
  # `declare -gx` re-creates them as globals when eval'ed below (not as locals).
  saved="$(export -p | grep -E '^declare -x CHAT_[A-Z0-9_]+=' | sed 's/^declare -x /declare -gx /' || true)"
  set -a
  # shellcheck source=../cluster.env
  . "$CHAT_ROOT/deploy/cluster.env"
  if [ -n "${CHAT_CONFIG:-}" ]; then
    [ -r "$CHAT_CONFIG" ] || chat_die "CHAT_CONFIG=$CHAT_CONFIG: no such file"
    # shellcheck source=/dev/null
    . "$CHAT_CONFIG"
  fi
  set +a
  eval "$saved" # the environment wins over both files
  local var
  for var in CHAT_PYTHON CHAT_RUN_DIR CHAT_LOG_DIR CHAT_CURVE_KEY CHAT_CONFIG; do
    case "${!var:-}" in
      "" | /*) ;;
      *) printf -v "$var" '%s' "$CHAT_ROOT/${!var}" ;;
    esac
  done
  [ -x "$CHAT_PYTHON" ] || chat_die "CHAT_PYTHON=$CHAT_PYTHON is not an interpreter (run make first)"
  if [ -n "$CHAT_CURVE_KEY" ] && [ ! -r "$CHAT_CURVE_KEY" ]; then
    chat_die "CHAT_CURVE_KEY=$CHAT_CURVE_KEY: cannot read it"
  fi
  CHAT_SUPERVISOR="$(dirname "$CHAT_PYTHON")"
  export CHAT_ROOT CHAT_SUPERVISOR
  for var in $(compgen -v CHAT_); do export "${var?}"; done
}

# chat_roles ROLE: sets CHAT_ROLE_NAME (used in socket, pid and log names) and
# CHAT_ROLE_FILES (the program files deploy/supervisor/roles.conf includes).
# ROLE is all (register,gateway,worker,web) or a comma-separated list of
# register, gateway, worker, web.
chat_roles() {
  local role="$1" files="" name="" part
  [ -n "$role" ] || chat_die "no role given"
  [ "$role" = all ] && role=register,gateway,worker,web
  IFS=, read -ra parts <<<"$role"
  for part in "${parts[@]}"; do
    case "$part" in
      register | gateway | worker | web) ;;
      *) chat_die "unknown role '$part' (all, register, gateway, worker, web, or a comma list)" ;;
    esac
    files="$files $part.ini"
    name="${name:+$name-}$part"
  done
  [ "$1" = all ] && name=all
  CHAT_ROLE_NAME="$name"
  CHAT_ROLE_FILES="${files# }"
  export CHAT_ROLE_NAME CHAT_ROLE_FILES
  CHAT_SOCKET="$CHAT_RUN_DIR/$CHAT_ROLE_NAME.sock"
  [ "${#CHAT_SOCKET}" -lt 100 ] ||
    chat_die "control socket path too long (${#CHAT_SOCKET} >= 100): $CHAT_SOCKET; shorten CHAT_RUN_DIR"
}

chat_check_counts() {
  local var
  for var in CHAT_GATEWAYS CHAT_WORKERS CHAT_GATEWAY_STOPWAIT CHAT_WORKER_STOPWAIT; do
    [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || chat_die "$var=${!var} must be a positive integer"
  done
  [[ "$CHAT_INTERNAL_PORT" =~ ^[0-9]+$ ]] || chat_die "CHAT_INTERNAL_PORT must be a number"
  if [ "$CHAT_INTERNAL_PORT" = 0 ]; then
    case "$CHAT_INTERNAL_BIND" in
      0.0.0.0 | "*" | "::" | "[::]")
        chat_die "CHAT_INTERNAL_PORT=0 (any port) needs a concrete CHAT_INTERNAL_BIND, not $CHAT_INTERNAL_BIND: give a port and CHAT_ADVERTISE" ;;
    esac
    [ -z "$CHAT_ADVERTISE" ] || [ "$CHAT_ADVERTISE" = "$CHAT_INTERNAL_BIND" ] ||
      chat_die "CHAT_ADVERTISE needs a fixed CHAT_INTERNAL_PORT (the port is not known in advance)"
  fi
}
