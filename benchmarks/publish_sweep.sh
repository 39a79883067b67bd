#!/usr/bin/env bash
# Publishes a sweep while it runs: every INTERVAL seconds, copies its report (results.*, lr_search.json, pareto.png,
# the per-run logs and the sweep's log) into a docs/results directory, and commits that directory alone whenever
# results.json or lr_search.json changed, so a machine that goes away loses at most the run in progress. Restart the
# sweep with `--reuse DEST` to take the published runs instead of training them again.
#   nohup setsid benchmarks/publish_sweep.sh sweeps/pareto-cpu-v3 docs/results/pareto-cpu-v3 sweeps/pareto-cpu-v3.log &
set -uo pipefail
sweep=$1 dest=$2 log=$3 interval=${4:-120}
name=$(basename "$dest")
while true; do
    if [ -f "$sweep/results.json" ]; then
        mkdir -p "$dest/logs"
        for file in results.json results.csv results.md lr_search.json pareto.png; do
            [ -f "$sweep/$file" ] && cp "$sweep/$file" "$dest/$file"
        done
        [ -d "$sweep/logs" ] && cp "$sweep"/logs/*.jsonl "$dest/logs/" 2>/dev/null
        cp "$log" "$dest/sweep.log"
        if ! git diff --quiet HEAD -- "$dest/results.json" "$dest/lr_search.json" 2>/dev/null; then
            rows=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$dest/results.json" \
                   2>/dev/null || echo "?")
            git add -- "$dest" && git commit --quiet -m "$name: results so far ($rows rows)" -- "$dest" \
                || echo "publish: commit failed, retrying in ${interval}s" >&2
        fi
    fi
    sleep "$interval"
done
