# Sourced by scripts/test and scripts/run: the virtualenv and where RabbitMQ and PostgreSQL are.
#
# ensure_venv EXTRA      creates/updates .venv and installs the project (`-e .EXTRA`, e.g. "[test]" or "");
#                        SKIP_INSTALL=1 skips pip once .venv exists. PYTHON picks the interpreter (python3).
# discover_services      sets DATABASE_URL / AMQP_URL, first match per service:
#                          - the variable from the environment;
#                          - a local server on 127.0.0.1:5432 / 127.0.0.1:5672 (database $LOCAL_DATABASE);
#                          - a Docker engine (`docker info`): the caller's `use_docker` function, which is told
#                            what is missing through need_db / need_amqp;
#                          - start the locally installed PostgreSQL / RabbitMQ and wait for them
#                            (SERVICE_WAIT_SECONDS, default 90).
#                        and says where each came from (db_source, amqp_source).
# The caller sets SCRIPT (for log lines) and defines use_docker before calling discover_services.

log() { printf '[%s] %s\n' "$SCRIPT" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
redact() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"; }

ensure_venv() {  # ensure_venv EXTRA
    local python=${PYTHON:-python3}
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    if [[ ! -x .venv/bin/python ]]; then
        log "creating .venv with $("$python" --version 2>&1)"
        "$python" -m venv .venv || die "cannot create .venv with $python"
    elif [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
        return 0
    fi
    log "installing -e '.$1' into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip || log "warning: could not upgrade pip, continuing"
    .venv/bin/python -m pip install --quiet -e ".$1" || die "pip install -e '.$1' failed"
}

LOCAL_DATABASE=${LOCAL_DATABASE:-postgres}
LOCAL_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2F'

listening() {  # listening PORT
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

wait_for_port() {  # wait_for_port PORT NAME
    local port=$1 name=$2 i
    for ((i = 0; i < ${SERVICE_WAIT_SECONDS:-90}; i++)); do
        listening "$port" && return 0
        sleep 1
    done
    die "$name did not start listening on 127.0.0.1:$port within ${SERVICE_WAIT_SECONDS:-90}s"
}

start_postgres() {
    command -v pg_ctlcluster >/dev/null \
        || die "no PostgreSQL: DATABASE_URL unset, nothing on 127.0.0.1:5432, no Docker engine, and pg_ctlcluster not installed"
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [[ -n "$version" ]] || die "no PostgreSQL cluster found under /etc/postgresql"
    log "starting local PostgreSQL $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start \
        || log "warning: pg_ctlcluster start returned an error, waiting for the port anyway"
    wait_for_port 5432 PostgreSQL
}

start_rabbitmq() {
    command -v rabbitmq-server >/dev/null \
        || die "no RabbitMQ: AMQP_URL unset, nothing on 127.0.0.1:5672, no Docker engine, and rabbitmq-server not installed"
    log "starting local RabbitMQ (rabbitmq-server -detached)"
    rabbitmq-server -detached \
        || log "warning: rabbitmq-server -detached returned an error, waiting for the port anyway"
    wait_for_port 5672 RabbitMQ
}

discover_services() {
    local local_db_url="postgresql://postgres@127.0.0.1:5432/$LOCAL_DATABASE"
    need_db=0 need_amqp=0
    if [[ -n "${DATABASE_URL:-}" ]]; then
        db_source="DATABASE_URL from environment: $(redact "$DATABASE_URL")"
    elif listening 5432; then
        export DATABASE_URL=$local_db_url
        db_source="local server: $DATABASE_URL"
    else
        need_db=1
    fi
    if [[ -n "${AMQP_URL:-}" ]]; then
        amqp_source="AMQP_URL from environment: $(redact "$AMQP_URL")"
    elif listening 5672; then
        export AMQP_URL=$LOCAL_AMQP_URL
        amqp_source="local broker: $(redact "$AMQP_URL")"
    else
        need_amqp=1
    fi
    if ((need_db || need_amqp)); then
        if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
            use_docker
        else
            if ((need_db)); then
                start_postgres
                export DATABASE_URL=$local_db_url
                db_source="local server (started by $SCRIPT): $DATABASE_URL"
            fi
            if ((need_amqp)); then
                start_rabbitmq
                export AMQP_URL=$LOCAL_AMQP_URL
                amqp_source="local broker (started by $SCRIPT): $(redact "$AMQP_URL")"
            fi
        fi
    fi
    log "PostgreSQL: $db_source"
    log "RabbitMQ:   $amqp_source"
}
