# shellcheck shell=bash
# Loads the deployment settings; sourced by deploy/run, deploy/ctl, deploy/reload-workers
# and deploy/bin/program. Precedence: the environment > $CHAT_CONFIG > deploy/cluster.env.
# Afterwards every CHAT_* setting is exported, with paths made absolute, and
#   CHAT_ROOT        the repository
#   CHAT_SUPERVISOR  the directory of the supervisor programs (supervisord, supervisorctl)
#   CHAT_USER        the account running this (supervisord's user=: it stays that account)

CHAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# A usage mistake or a bad setting: exit 2.
chat_die() {
  echo "deploy: $*" >&2
  exit 2
}

# Anything else that stops us (nothing runs, already running): exit 1.
chat_fail() {
  echo "deploy: $*" >&2
  exit 1
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
  [ -x "$CHAT_PYTHON" ] || chat_die "CHAT_PYTHON=$CHAT_PYTHON is not an interpreter (run make install first)"
  if [ -n "$CHAT_CURVE_KEY" ] && [ ! -r "$CHAT_CURVE_KEY" ]; then
    chat_die "CHAT_CURVE_KEY=$CHAT_CURVE_KEY: cannot read it"
  fi
  CHAT_SUPERVISOR="$(dirname "$CHAT_PYTHON")"
  CHAT_USER="$(id -un 2>/dev/null || id -u)"
  export CHAT_ROOT CHAT_SUPERVISOR CHAT_USER
  for var in $(compgen -v CHAT_); do export "${var?}"; done
}

# chat_roles ROLE: sets
#   CHAT_ROLE_NAME   used in socket, pid and log names (all, or e.g. register-gateway)
#   CHAT_ROLE_FILES  the files deploy/supervisor/roles.conf includes: the programs, with
#                    CHAT_FOREGROUND=1 their overrides in foreground/, and CHAT_LOGIN
#   CHAT_SOCKET      the control socket
#   CHAT_LOGIN       the control socket's login, written by deploy/run at each start;
#                    also the supervisorctl configuration deploy/ctl uses
# ROLE is all (register,gateway,worker,web) or a comma-separated list of
# register, gateway, worker, web.
chat_roles() {
  local role="$1" files="" foreground="" name="" part
  [ -n "$role" ] || chat_die "no role given"
  [ "$role" = all ] && role=register,gateway,worker,web
  IFS=, read -ra parts <<<"$role"
  for part in "${parts[@]}"; do
    case "$part" in
      register | gateway | worker | web) ;;
      *) chat_die "unknown role '$part' (all, register, gateway, worker, web, or a comma list)" ;;
    esac
    files="$files $part.ini"
    foreground="$foreground foreground/$part.ini"
    name="${name:+$name-}$part"
  done
  [ "$1" = all ] && name=all
  case "${CHAT_FOREGROUND:-0}" in
    0) ;;
    1) files="$files foreground/supervisord.ini$foreground" ;;
    *) chat_die "CHAT_FOREGROUND=$CHAT_FOREGROUND must be 0 or 1" ;;
  esac
  CHAT_ROLE_NAME="$name"
  CHAT_SOCKET="$CHAT_RUN_DIR/$CHAT_ROLE_NAME.sock"
  CHAT_LOGIN="$CHAT_RUN_DIR/$CHAT_ROLE_NAME.login"
  CHAT_ROLE_FILES="${files# } $CHAT_LOGIN"
  export CHAT_ROLE_NAME CHAT_ROLE_FILES CHAT_SOCKET CHAT_LOGIN
  [ "${#CHAT_SOCKET}" -lt 100 ] ||
    chat_die "control socket path too long (${#CHAT_SOCKET} >= 100): $CHAT_SOCKET; shorten CHAT_RUN_DIR"
}

# chat_role_parts NAME: the roles in a role name (all, or e.g. register-gateway).
chat_role_parts() {
  if [ "$1" = all ]; then echo register gateway worker web; else echo "${1//-/ }"; fi
}

# chat_live: "NAME PID" for each supervisord started from CHAT_RUN_DIR that still runs
# (its pid file names a live supervisord; a stale pid file is ignored).
chat_live() {
  local file pid
  for file in "$CHAT_RUN_DIR"/*.pid; do
    [ -f "$file" ] || continue
    pid="$(cat "$file" 2>/dev/null)" || continue
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q supervisord || continue
    echo "$(basename "$file" .pid) $pid"
  done
}

# chat_refuse_running: exit 1 if a live supervisord of CHAT_RUN_DIR already runs one
# of the roles of CHAT_ROLE_NAME (a second one would start a second cluster on the
# same ports: gateways share theirs).
chat_refuse_running() {
  local name pid part what mine
  mine=" $(chat_role_parts "$CHAT_ROLE_NAME") "
  while read -r name pid; do
    what=""
    for part in $(chat_role_parts "$name"); do
      case "$mine" in *" $part "*) what="${what:+$what,}$part" ;; esac
    done
    [ "$name" != "$CHAT_ROLE_NAME" ] || what="${name//-/,}"
    [ -z "$what" ] ||
      chat_fail "$what already running (pid $pid, deploy/run ${name//-/,} from $CHAT_RUN_DIR):" \
        "stop it first (deploy/ctl ${name//-/,} shutdown, or Ctrl-C where make run runs)"
  done < <(chat_live)
}

# chat_running COMMAND [NEEDS]: when no role is given, the supervisord to talk to: the
# one live supervisord of CHAT_RUN_DIR (that runs role NEEDS, if given), set up with
# chat_roles. Exits 1 if none runs, 2 if several do (then the role must be given).
chat_running() {
  local command="$1" needs="${2:-}" name pid found="" names=""
  while read -r name pid; do
    if [ -n "$needs" ]; then
      case " $(chat_role_parts "$name") " in *" $needs "*) ;; *) continue ;; esac
    fi
    found="$name"
    names="${names:+$names, }${name//-/,}"
  done < <(chat_live)
  case "$names" in
    "")
      chat_fail "no supervisord${needs:+ with ${needs}s} runs from $CHAT_RUN_DIR:" \
        "start one with make run or deploy/run ROLE"
      ;;
    *", "*)
      chat_die "several supervisords run from $CHAT_RUN_DIR ($names): give the role," \
        "e.g. $command ${names%%, *} ..."
      ;;
  esac
  chat_roles "${found//-/,}"
}

# chat_check_running: exit 1 unless the supervisord of CHAT_ROLE_NAME runs.
chat_check_running() {
  local name pid names=""
  while read -r name pid; do
    [ "$name" != "$CHAT_ROLE_NAME" ] || return 0
    names="${names:+$names, }${name//-/,}"
  done < <(chat_live)
  chat_fail "no supervisord for ${CHAT_ROLE_NAME//-/,} runs from $CHAT_RUN_DIR" \
    "(${names:+running: $names, give that role or none; }start it with deploy/run ${CHAT_ROLE_NAME//-/,})"
}

# chat_write_login: a new random login for the control socket (supervisord warns of
# a socket without one) into CHAT_LOGIN, mode 600. supervisord includes it, and it is
# the supervisorctl configuration of deploy/ctl and deploy/lib/reload_workers.py.
chat_write_login() {
  local password
  password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  [ "${#password}" = 32 ] || chat_fail "cannot make a password from /dev/urandom"
  (
    umask 077
    printf '%s\n' \
      "; Written by deploy/run at each start (mode 600): the login of this supervisord's" \
      "; control socket. supervisord includes it; deploy/ctl runs supervisorctl -c on it." \
      "[unix_http_server]" "username=chat" "password=$password" "" \
      "[supervisorctl]" "serverurl=unix://$CHAT_SOCKET" "username=chat" "password=$password" \
      >"$CHAT_LOGIN.new"
  ) && mv -f "$CHAT_LOGIN.new" "$CHAT_LOGIN" || chat_fail "cannot write $CHAT_LOGIN"
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
