#!/usr/bin/env bash
# Make sure RabbitMQ and Redis answer; start the local ones if they do not.
# With FAREBOX_AMQP_URL / FAREBOX_REDIS_URL pointing elsewhere, only checks them.
set -euo pipefail

answers() {  # host port
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_for() {  # name host port seconds
  for _ in $(seq 1 "$4"); do answers "$2" "$3" && return 0; sleep 1; done
  echo "services: $1 did not come up on $2:$3" >&2; return 1
}

if ! answers 127.0.0.1 6379; then
  if command -v redis-server >/dev/null; then
    echo "services: starting redis-server" >&2
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for redis 127.0.0.1 6379 30
  else
    echo "services: Redis is not answering on 127.0.0.1:6379 and redis-server is not installed" >&2
  fi
fi

if ! answers 127.0.0.1 5672; then
  if command -v rabbitmq-server >/dev/null; then
    echo "services: starting rabbitmq-server" >&2
    rabbitmq-server -detached || true
    wait_for rabbitmq 127.0.0.1 5672 90
    rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  else
    echo "services: RabbitMQ is not answering on 127.0.0.1:5672 and rabbitmq-server is not installed" >&2
  fi
fi
