#!/usr/bin/env bash
# The main job: set up, start the whole pipeline (with the local provider emulator when no API
# key is set), run a sample summarization/classification backfill through it, print the results'
# summary and the spend report, then stop the pipeline.
#   JOBS=1000 DUP_RATE=0.3 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
JOBS=${JOBS:-300}
DUP_RATE=${DUP_RATE:-0.3}
OUT=${OUT:-out/demo-results.jsonl}
mkdir -p out
export FAREBOX_NAMESPACE=${FAREBOX_NAMESPACE:-farebox-demo}
# A fresh ledger/cache prefix per run, so the report below shows this run only; earlier demo runs'
# keys are removed (only theirs: keys under farebox-demo-<timestamp>: with a timestamp over an
# hour old, so a demo running at the same time keeps its own), so repeated demos do not pile up.
if [ -z "${FAREBOX_REDIS_PREFIX:-}" ]; then
  export FAREBOX_REDIS_PREFIX="farebox-demo-$(date +%s):"
  .venv/bin/python - <<'PY'
import asyncio, re, time
from farebox.settings import Settings
from redis.asyncio import Redis

def stale(key: bytes) -> bool:
    m = re.match(rb"farebox-demo-(\d+):", key)
    return m is not None and int(m.group(1)) < time.time() - 3600

async def main() -> None:
    redis = Redis.from_url(Settings().redis_url)
    old = [k async for k in redis.scan_iter(match="farebox-demo-*", count=1000) if stale(k)]
    for i in range(0, len(old), 500):
        await redis.delete(*old[i:i + 500])
    await redis.aclose()

asyncio.run(main())
PY
fi
WORKLOAD=../shared/workloads/make_workload.py
if [ -f "$WORKLOAD" ]; then
  .venv/bin/python "$WORKLOAD" --jobs "$JOBS" --dup-rate "$DUP_RATE" --seed 7 > out/demo-jobs.jsonl 2> out/demo-workload.json
  echo "demo: $JOBS jobs from ../shared/workloads ($(cat out/demo-workload.json))"
else
  cp examples/sample_jobs.jsonl out/demo-jobs.jsonl
  echo "demo: ../shared not found; using examples/sample_jobs.jsonl"
fi
rm -f "$OUT"
.venv/bin/farebox up > out/demo-up.log 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
# Wait (up to 60 s) until the stages consume the intake, so the submit below does not warn that
# no pipeline is running while they are still starting.
.venv/bin/python - <<'PY' || echo "demo: the pipeline did not start consuming within 60 s (see out/demo-up.log)"
import asyncio, sys, time
import aiormq
from farebox.amqp_connect import connect_any
from farebox.settings import Settings

async def main() -> int:
    s = Settings()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = await connect_any(s.amqp_urls)  # the first node of FAREBOX_AMQP_URL that answers
            async with conn:
                queue = await (await conn.channel()).declare_queue(s.topology.intake, passive=True)
                if queue.declaration_result.consumer_count:
                    return 0
        except (aiormq.exceptions.ChannelNotFoundEntity, aiormq.exceptions.AMQPConnectionError, OSError):
            pass
        await asyncio.sleep(0.5)
    return 1

sys.exit(asyncio.run(main()))
PY
head -n 3 out/demo-up.log || true
.venv/bin/farebox submit out/demo-jobs.jsonl -o "$OUT" || [ $? -eq 1 ]  # 1: some jobs ended in an error result, kept in $OUT
echo
echo "demo: first results (full file: $OUT)"
.venv/bin/python examples/show_results.py "$OUT" 5
echo
.venv/bin/farebox report --by tenant,model
echo "demo: this run's ledger is under Redis prefix $FAREBOX_REDIS_PREFIX until a demo run an hour later" \
  "(FAREBOX_REDIS_PREFIX=$FAREBOX_REDIS_PREFIX .venv/bin/farebox report shows it again)"
