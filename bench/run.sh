#!/usr/bin/env bash
# Side-by-side benchmark: the same mock upstream driven
#   (a) directly, (b) through nginx, (c) through Turnpike, (d) through Turnpike with API-key
#   authentication and a local rate limit on the route (`turnpike-policies`),
# with wrk (HTTP/1.1) and h2load (HTTP/2, h2c prior knowledge), then a latency run at half of
# Turnpike's saturated rate with a constant-rate client (h2load --rps, for both protocols).
#
# Usage:  bench/run.sh            (from anywhere; needs root only to install missing tools)
#         bench/run.sh observe    what observability costs: the same Turnpike route with every
#                                 sink off (bare), with metrics, with metrics + a file access log,
#                                 and with metrics + access log + the call-log store (observed),
#                                 interleaved in one run; saturation only, no nginx.
#
# Knobs (environment):
#   DURATION=12        seconds per measured run         WARMUP=3   seconds of warm-up per run
#   REPEATS=3          rounds of the whole set; the table shows the median of the rounds
#   THREADS=$(nproc)   Turnpike worker threads (TOKIO_WORKER_THREADS) = nginx worker_processes
#                      = demo upstream worker threads
#   H1_CONNS=50        wrk connections                  LOADGEN_THREADS=2  wrk/h2load threads
#   H2_CONNS=10 H2_STREAMS=10   h2load connections and max concurrent streams per connection
#   HALF_H1_CONNS=50   h2load --h1 connections for the half-load run
#   TURNPIKE_BIN=...   use this binary instead of building target/release/turnpike
#   NO_DOC=1           do not rewrite docs/BENCHMARKS.md (results still in bench/out/)
#   TABLE_ONLY=1       no measuring: re-render the table from bench/out/results.tsv
#
# Raw outputs go to bench/out/ (gitignored). The section of docs/BENCHMARKS.md between the
# BENCH:BEGIN / BENCH:END markers is regenerated; the rest of that file is left alone.
# This is a benchmark, not a test: CI does not run it.
set -euo pipefail

MODE=${1:-proxy}
case $MODE in
proxy | observe) ;;
*) printf 'usage: bench/run.sh [observe]\n' >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench/out"
DOC="$ROOT/docs/BENCHMARKS.md"

DURATION=${DURATION:-12}
WARMUP=${WARMUP:-3}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-$(nproc)}
H1_CONNS=${H1_CONNS:-50}
H2_CONNS=${H2_CONNS:-10}
H2_STREAMS=${H2_STREAMS:-10}
HALF_H1_CONNS=${HALF_H1_CONNS:-50}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
if [[ $MODE == observe ]]; then
    TARGETS=(bare metrics accesslog observed)
else
    TARGETS=(direct nginx turnpike turnpike-policies)
fi
# Every client sends this key (printf %s bench-key | sha256sum); only turnpike-policies reads it.
API_KEY=bench-key
PROTOS=(h1 h2)

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Cleanup: everything this script starts is tracked here and stopped on exit.
TMP=$(mktemp -d /tmp/turnpike-bench.XXXXXX)
chmod 755 "$TMP" # nginx workers run as an unprivileged user
PIDS=()
POLICY_RC_CREATED=0
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if ((POLICY_RC_CREATED)); then rm -f /usr/sbin/policy-rc.d; fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() { # remove $1 from PIDS
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# ---------------------------------------------------------------------------------------------
# Tools: install only what is missing, without leaving nginx running as a system service.
need=()
if [[ $MODE == proxy ]]; then
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
fi
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
if ((${#need[@]})); then
    [[ $EUID -eq 0 ]] || die "missing ${need[*]}; run as root to install them (apt-get)"
    log "installing ${need[*]}"
    # Debian starts a freshly installed nginx as a service; policy-rc.d forbids that.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    if ((POLICY_RC_CREATED)); then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
    if [[ " ${need[*]} " == *" nginx "* ]]; then
        # In case an init system started it anyway: stop it and keep it from starting at boot.
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
            systemctl disable --now nginx >&2 || true
        elif command -v service >/dev/null 2>&1; then
            service nginx stop >/dev/null 2>&1 || true
        fi
    fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [[ $MODE == proxy ]]; then
    NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's|.*nginx/||')
else
    NGINX_VERSION=unused
fi

# ---------------------------------------------------------------------------------------------
# Report: the table (bench/out/table.md) and the marked section of docs/BENCHMARKS.md, from
# bench/out/results.tsv. `TABLE_ONLY=1 bench/run.sh` re-renders them without measuring.
if [[ $MODE == observe ]]; then
    RESULTS="$OUT/observe.tsv"
    SINKS="$OUT/observe-sinks.tsv"
    TABLE="$OUT/observe-table.md"
    PARAMS="$OUT/observe-params.env"
    PREFIX=obs- # of raw outputs and logs, so the proxy benchmark's stay
else
    RESULTS="$OUT/results.tsv"
    TABLE="$OUT/table.md"
    PARAMS="$OUT/params.env"
    PREFIX=
fi

# Median over rounds of column $col for (phase, proto, target).
median_of() { # phase proto target column_name
    awk -F'\t' -v ph="$1" -v pr="$2" -v tg="$3" -v col="$4" '
        NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
        $1 == ph && $3 == pr && $4 == tg { v[++n] = $c }
        END {
            if (n == 0) { print "nan"; exit }
            for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] + 0 > x + 0) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
            if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }' "$RESULTS"
}

report() {
    local proto target range cpu10k errs cpu_cell rss_cell d99 p99 added
    declare -A HALF_RATE
    for proto in "${PROTOS[@]}"; do
        HALF_RATE[$proto]=$(awk -F'\t' -v pr="$proto" '$1 == "half" && $3 == pr {print $5; exit}' "$RESULTS")
    done
    CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    WRK_VERSION=$( (wrk -v 2>&1 || true) | head -1 | awk '{print $2}')
    H2LOAD_VERSION=$( (h2load --version 2>&1 || true) | head -1 | awk '{print $2}')

    fmt() { awk -v x="$1" -v d="${2:-0}" 'BEGIN {if (x == "nan" || x == "") print "n/a"; else printf "%." d "f", x}'; }

    {
        echo "Generated by \`bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
        echo
        echo "- Machine: $(nproc) CPUs, $CPU_MODEL, Linux $(uname -r); load generator, proxy and upstream share all of them."
        echo "- Versions: turnpike $TURNPIKE_DESC, nginx $NGINX_VERSION, wrk $WRK_VERSION, h2load $H2LOAD_VERSION."
        echo "- Shape: $THREADS threads for Turnpike (\`TOKIO_WORKER_THREADS\`), nginx (\`worker_processes\`) and the mock upstream;"
        echo "  $REPEATS round(s), targets interleaved (order rotated each round), each run ${WARMUP}s warm-up + ${DURATION}s measured"
        echo "  against a freshly started proxy; every figure is the median over the rounds."
        echo "- HTTP/1.1: \`wrk -t$LOADGEN_THREADS -c$H1_CONNS --latency\`. HTTP/2 (h2c prior knowledge): \`h2load -t$LOADGEN_THREADS -c$H2_CONNS -m$H2_STREAMS\`,"
        echo "  percentiles computed from h2load's per-request \`--log-file\` (nearest rank). Both proxies speak HTTP/1.1"
        echo "  with keep-alive to the upstream."
        echo "- Proxy CPU = utime+stime of the proxy's processes (nginx: master + workers) over the measured run."
        echo "  Peak RSS = \`VmHWM\` (nginx: summed over master + workers, so shared pages count more than once)."
        echo
        echo "### Saturation (closed loop)"
        echo
        echo "| Protocol | Target | Requests/s (min–max) | p50 ms | p99 ms | Proxy CPU s / 10k req | Proxy peak RSS MiB | Errors |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
        for proto in "${PROTOS[@]}"; do
            for target in "${TARGETS[@]}"; do
                range=$(awk -F'\t' -v pr="$proto" -v tg="$target" 'NR > 1 && $1 == "sat" && $3 == pr && $4 == tg {
                    if (mn == "" || $6 + 0 < mn) mn = $6 + 0; if ($6 + 0 > mx) mx = $6 + 0 }
                    END {printf "%.0f–%.0f", mn, mx}' "$RESULTS")
                cpu10k=$(awk -F'\t' -v pr="$proto" -v tg="$target" 'NR > 1 && $1 == "sat" && $3 == pr && $4 == tg && $9 > 0 {
                    v[++n] = $11 / $9 * 10000 }
                    END { if (n == 0) { print "nan"; exit }
                      for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
                      if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }' "$RESULTS")
                errs=$(awk -F'\t' -v pr="$proto" -v tg="$target" 'NR > 1 && $1 == "sat" && $3 == pr && $4 == tg {n += $10} END {print n + 0}' "$RESULTS")
                if [[ $target == direct ]]; then
                    cpu_cell="—"
                    rss_cell="—"
                else
                    cpu_cell=$(fmt "$cpu10k" 3)
                    rss_cell=$(fmt "$(awk -v k="$(median_of sat "$proto" "$target" proxy_rss_kb)" 'BEGIN {print k / 1024}')" 1)
                fi
                echo "| $proto | $target | $(fmt "$(median_of sat "$proto" "$target" rps)") ($range) | $(fmt "$(median_of sat "$proto" "$target" p50_ms)" 3) | $(fmt "$(median_of sat "$proto" "$target" p99_ms)" 3) | $cpu_cell | $rss_cell | $errs |"
            done
        done
        echo
        echo "### What the policies cost"
        echo
        echo "\`turnpike-policies\` is the same route with \`key_auth\` and a local \`rate_limit\` per application"
        echo "(never refusing). Throughput kept = its median saturated rate / plain Turnpike's; CPU added = the"
        echo "difference in mean proxy CPU per 10k requests."
        echo
        echo "| Protocol | Throughput kept | Throughput lost | CPU s / 10k req added |"
        echo "|---|---:|---:|---:|"
        for proto in "${PROTOS[@]}"; do
            local plain pol cp cq
            plain=$(median_of sat "$proto" turnpike rps)
            pol=$(median_of sat "$proto" turnpike-policies rps)
            cp=$(awk -F'\t' -v pr="$proto" 'NR > 1 && $1 == "sat" && $3 == pr && $4 == "turnpike" && $9 > 0 {s += $11 / $9 * 10000; n++} END {print n ? s / n : "nan"}' "$RESULTS")
            cq=$(awk -F'\t' -v pr="$proto" 'NR > 1 && $1 == "sat" && $3 == pr && $4 == "turnpike-policies" && $9 > 0 {s += $11 / $9 * 10000; n++} END {print n ? s / n : "nan"}' "$RESULTS")
            echo "| $proto | $(awk -v a="$pol" -v b="$plain" 'BEGIN {printf "%.1f%%", 100 * a / b}') | $(awk -v a="$pol" -v b="$plain" 'BEGIN {printf "%.1f%%", 100 - 100 * a / b}') | $(awk -v a="$cq" -v b="$cp" 'BEGIN {printf "%+.3f", a - b}') |"
        done
        echo
        echo "### Latency at half load (constant rate)"
        echo
        echo "Constant-rate client for both protocols: \`h2load --rps\` (paced per connection; HTTP/1.1 with \`--h1 -c$HALF_H1_CONNS\`,"
        echo "HTTP/2 with \`-c$H2_CONNS -m$H2_STREAMS\`), at half of Turnpike's median saturated rate for that protocol."
        echo "Latency is measured from when a request is sent, so it would understate queueing near saturation; at half load"
        echo "the client keeps up with its schedule (compare achieved with offered rate)."
        echo
        echo "| Protocol | Offered req/s | Target | Achieved req/s | p50 ms | p99 ms | p99 added over direct, ms | Proxy CPU s / 10k req |"
        echo "|---|---:|---|---:|---:|---:|---:|---:|"
        for proto in "${PROTOS[@]}"; do
            d99=$(median_of half "$proto" direct p99_ms)
            for target in "${TARGETS[@]}"; do
                p99=$(median_of half "$proto" "$target" p99_ms)
                if [[ $target == direct ]]; then
                    added="—"
                    cpu_cell="—"
                else
                    added=$(awk -v a="$p99" -v b="$d99" 'BEGIN {printf "%+.3f", a - b}')
                    cpu_cell=$(fmt "$(awk -F'\t' -v pr="$proto" -v tg="$target" 'NR > 1 && $1 == "half" && $3 == pr && $4 == tg && $9 > 0 {
                        v[++n] = $11 / $9 * 10000 }
                        END { if (n == 0) { print "nan"; exit }
                          for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
                          if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }' "$RESULTS")" 3)
                fi
                echo "| $proto | ${HALF_RATE[$proto]} | $target | $(fmt "$(median_of half "$proto" "$target" rps)") | $(fmt "$(median_of half "$proto" "$target" p50_ms)" 3) | $(fmt "$p99" 3) | $added | $cpu_cell |"
            done
        done
        echo
        echo "### Against the target"
        echo
        echo "Target: Turnpike ≥ nginx throughput, at ≤ nginx CPU per request, p99 added over direct ≤ 1 ms at half load."
        echo
        for proto in "${PROTOS[@]}"; do
            awk -F'\t' -v pr="$proto" '
                function med(ph, tg, what,    n, i, j, x, v) {
                    n = 0
                    for (k = 1; k <= N; k++) if (P[k] == ph && R[k] == pr && T[k] == tg) {
                        if (what == "rps") v[++n] = RPS[k]
                        else if (what == "cpu") { if (Q[k] > 0) v[++n] = CPU[k] / Q[k] * 10000 }
                        else v[++n] = P99[k]
                    }
                    if (n == 0) return "nan"
                    for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
                    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
                }
                NR > 1 { N++; P[N] = $1; R[N] = $3; T[N] = $4; RPS[N] = $6; P99[N] = $8; Q[N] = $9; CPU[N] = $11 }
                END {
                    tr = med("sat", "turnpike", "rps"); nr = med("sat", "nginx", "rps")
                    tc = med("sat", "turnpike", "cpu"); nc = med("sat", "nginx", "cpu")
                    ta = med("half", "turnpike", "p99") - med("half", "direct", "p99")
                    na = med("half", "nginx", "p99") - med("half", "direct", "p99")
                    printf "- %s: throughput Turnpike/nginx = %.2f (%s); CPU per request Turnpike/nginx = %.2f (%s); ", pr, tr / nr, (tr >= nr) ? "met" : "NOT met", tc / nc, (tc <= nc) ? "met" : "NOT met"
                    printf "p99 added at half load = %.3f ms (%s; nginx adds %.3f ms).\n", ta, (ta <= 1) ? "met" : "NOT met", na
                }' "$RESULTS"
        done
        echo
        echo "Raw outputs of every run: \`bench/out/\` (\`results.tsv\` has one row per run)."
    } >"$TABLE"
    write_doc BENCH
}

# Prints $TABLE and puts it between the <!-- $1:BEGIN --> / <!-- $1:END --> markers of
# docs/BENCHMARKS.md (appending the markers if they are missing), unless NO_DOC is set.
write_doc() { # marker
    cat "$TABLE"
    [[ -z ${NO_DOC:-} ]] || return 0
    local begin="<!-- $1:BEGIN (generated by bench/run.sh; edits inside are overwritten) -->"
    local end="<!-- $1:END -->"
    mkdir -p "$(dirname "$DOC")"
    if [[ ! -f $DOC ]] || ! grep -qF "<!-- $1:BEGIN" "$DOC"; then
        {
            [[ -f $DOC ]] && cat "$DOC" || printf '# Benchmarks\n\nReproduce: `bench/run.sh`\n\n## Results\n\n'
            printf '\n%s\n%s\n' "$begin" "$end"
        } >"$TMP/doc.new"
        cp "$TMP/doc.new" "$DOC"
    fi
    awk -v table="$TABLE" -v b="<!-- $1:BEGIN" -v e="<!-- $1:END -->" '
        index($0, b) == 1 { print; while ((getline line < table) > 0) print line; skip = 1; next }
        index($0, e) == 1 { skip = 0 }
        !skip { print }' "$DOC" >"$TMP/doc.new"
    cp "$TMP/doc.new" "$DOC"
    log "updated $DOC"
}

# The observability table: each variant against bare, and what each sink delivered.
report_observe() {
    CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
    fmt() { awk -v x="$1" -v d="${2:-0}" 'BEGIN {if (x == "nan" || x == "") print "n/a"; else printf "%." d "f", x}'; }
    cpu_per_10k() { # proto target -> median proxy CPU s / 10k requests
        awk -F'\t' -v pr="$1" -v tg="$2" 'NR > 1 && $3 == pr && $4 == tg && $9 > 0 { v[++n] = $11 / $9 * 10000 }
            END { if (n == 0) { print "nan"; exit }
              for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
              if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }' "$RESULTS"
    }
    {
        echo "Generated by \`bench/run.sh observe\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
        echo
        echo "- Machine: $(nproc) CPUs, $CPU_MODEL, Linux $(uname -r); load generator, Turnpike and upstream share all of them."
        echo "- Turnpike $TURNPIKE_DESC, $THREADS worker threads; $REPEATS round(s), variants interleaved (order rotated"
        echo "  each round), each run ${WARMUP}s warm-up + ${DURATION}s measured against a freshly started gateway;"
        echo "  HTTP/1.1 \`wrk -t$LOADGEN_THREADS -c$H1_CONNS\`, HTTP/2 \`h2load -t$LOADGEN_THREADS -c$H2_CONNS -m$H2_STREAMS\`. Figures are medians over the rounds."
        echo "- Variants of the same route: **bare** (\`metrics.enabled: false\`, \`--store none\`), **metrics** (the default"
        echo "  Prometheus metrics), **accesslog** (metrics + an access log to a file), **observed** (metrics + access log +"
        echo "  the embedded SQLite store with its defaults: every call written to the call-log store, analytics rollups)."
        echo
        echo "| Protocol | Variant | Requests/s (min–max) | p50 ms | p99 ms | CPU s / 10k req | Throughput vs bare | CPU per request vs bare | Errors |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
        local proto target range bare_rps bare_cpu rps cpu errs
        for proto in "${PROTOS[@]}"; do
            bare_rps=$(median_of sat "$proto" bare rps)
            bare_cpu=$(cpu_per_10k "$proto" bare)
            for target in "${TARGETS[@]}"; do
                range=$(awk -F'\t' -v pr="$proto" -v tg="$target" 'NR > 1 && $3 == pr && $4 == tg {
                    if (mn == "" || $6 + 0 < mn) mn = $6 + 0; if ($6 + 0 > mx) mx = $6 + 0 }
                    END {printf "%.0f–%.0f", mn, mx}' "$RESULTS")
                rps=$(median_of sat "$proto" "$target" rps)
                cpu=$(cpu_per_10k "$proto" "$target")
                errs=$(awk -F'\t' -v pr="$proto" -v tg="$target" 'NR > 1 && $3 == pr && $4 == tg {n += $10} END {print n + 0}' "$RESULTS")
                echo "| $proto | $target | $(fmt "$rps") ($range) | $(fmt "$(median_of sat "$proto" "$target" p50_ms)" 3) | $(fmt "$(median_of sat "$proto" "$target" p99_ms)" 3) | $(fmt "$cpu" 3) | $(awk -v a="$rps" -v b="$bare_rps" 'BEGIN {printf "%.1f%%", 100 * a / b}') | $(awk -v a="$cpu" -v b="$bare_cpu" 'BEGIN {printf "×%.2f", a / b}') | $errs |"
            done
        done
        echo
        echo "What each sink delivered, summed over the rounds (read from \`/metrics\` after the run, once the sink"
        echo "queues were empty; requests = \`turnpike_http_requests_total\`, warm-up included):"
        echo
        echo "| Protocol | Variant | Sink | Requests | Delivered | Dropped (queue full) | Failed | Delivered / requests |"
        echo "|---|---|---|---:|---:|---:|---:|---:|"
        awk -F'\t' 'NR > 1 { k = $2 "\t" $3 "\t" $4; if (!(k in req)) order[++n] = k; req[k] += $5; sent[k] += $6; drop[k] += $7; fail[k] += $8 }
            END { for (i = 1; i <= n; i++) { k = order[i]; split(k, f, "\t")
                printf "| %s | %s | %s | %d | %d | %d | %d | %.1f%% |\n", f[1], f[2], f[3], req[k], sent[k], drop[k], fail[k], req[k] ? 100 * sent[k] / req[k] : 0 } }' "$SINKS"
        echo
        echo "### Against the target"
        echo
        echo "Target: observed loses ≤ 5 % of bare's throughput. Each round runs every variant one after"
        echo "the other, so a round's own observed/bare ratio is less exposed to the machine's speed drifting"
        echo "between rounds than the ratio of the medians; the verdict takes the worse of the two."
        echo
        for proto in "${PROTOS[@]}"; do
            awk -F'\t' -v pr="$proto" -v a="$(median_of sat "$proto" observed rps)" -v b="$(median_of sat "$proto" bare rps)" \
                -v ca="$(cpu_per_10k "$proto" observed)" -v cb="$(cpu_per_10k "$proto" bare)" '
                NR > 1 && $1 == "sat" && $3 == pr && $4 == "observed" { obs[$2] = $6 }
                NR > 1 && $1 == "sat" && $3 == pr && $4 == "bare" { bare[$2] = $6 }
                END {
                    n = 0; list = ""
                    for (r in obs) if ((r in bare) && bare[r] > 0) v[++n] = 100 - 100 * obs[r] / bare[r]
                    for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
                    for (i = 1; i <= n; i++) list = list (i > 1 ? ", " : "") sprintf("%.1f", v[i])
                    paired = (n == 0) ? 0 : (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2)
                    lost = 100 - 100 * a / b; worse = (paired > lost) ? paired : lost
                    printf "- %s: %.1f%% lost by the medians; per round, least first, %s%% (median %.1f%%); CPU per request +%.2f µs (%s).\n",
                        pr, lost, list, paired, (ca - cb) * 100, (worse <= 5) ? "met" : "NOT met"
                }' "$RESULTS"
        done
        echo
        echo "Raw outputs: \`bench/out/\` (\`observe.tsv\` one row per run, \`observe-sinks.tsv\` the sink counts)."
    } >"$TABLE"
    write_doc BENCH-OBSERVE
}

if [[ -n ${TABLE_ONLY:-} ]]; then
    [[ -s $RESULTS && -s $PARAMS ]] || die "no $RESULTS to render"
    # shellcheck source=/dev/null
    source "$PARAMS" # the knobs of the run that produced the results
    if [[ $MODE == observe ]]; then report_observe; else report; fi
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Turnpike binary.
if [[ -n ${TURNPIKE_BIN:-} ]]; then
    BIN=$TURNPIKE_BIN
    TURNPIKE_DESC="binary given as TURNPIKE_BIN ($BIN, built $(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC'))"
else
    log "building turnpike (release)"
    TURNPIKE_DESC="commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        TURNPIKE_DESC="$TURNPIKE_DESC plus the uncommitted changes in the working tree at $(date -u '+%H:%M UTC')"
    fi
    (cd "$ROOT" && cargo build --release -p turnpike >&2)
    BIN="$ROOT/target/release/turnpike"
fi
[[ -x $BIN ]] || die "no turnpike binary at $BIN"

mkdir -p "$OUT"
if [[ $MODE == observe ]]; then
    rm -f "$OUT"/obs-*.txt "$OUT"/obs-*.log "$RESULTS" "$SINKS" "$TABLE" "$PARAMS"
else
    rm -f "$OUT"/sat-*.txt "$OUT"/half-*.txt "$OUT"/upstream.log "$OUT"/turnpike.log "$OUT"/nginx.log \
        "$RESULTS" "$TABLE" "$PARAMS"
fi
for knob in DURATION WARMUP REPEATS THREADS H1_CONNS H2_CONNS H2_STREAMS HALF_H1_CONNS LOADGEN_THREADS TURNPIKE_DESC; do
    printf '%s=%q\n' "$knob" "${!knob}"
done >"$PARAMS"
ulimit -n 65536 2>/dev/null || true
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Ports: first free port at or above a base.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p=$1
    while port_in_use "$p"; do p=$((p + 1)); done
    echo "$p"
}
UP_PORT=$(free_port 19081)
TP_PORT=$(free_port $((UP_PORT + 1)))
NG_H1_PORT=$(free_port $((TP_PORT + 1)))
NG_H2_PORT=$(free_port $((NG_H1_PORT + 1)))
STATUS_PORT=$(free_port $((NG_H2_PORT + 1)))
ADMIN_PORT=$(free_port $((STATUS_PORT + 1)))

# ---------------------------------------------------------------------------------------------
# Configurations.
cat >"$TMP/turnpike.yaml" <<EOF
version: 1
server:
  listeners:
    - name: bench
      address: 127.0.0.1:$TP_PORT
  drain_timeout: 1s
upstreams:
  - name: mock
    targets:
      - address: 127.0.0.1:$UP_PORT
routes:
  - name: all
    paths:
      - prefix: /
    upstream: mock
EOF
"$BIN" validate "$TMP/turnpike.yaml" >&2 || die "turnpike rejected the benchmark config"
# The same route with API-key auth and a local rate limit per application, set high enough
# never to refuse: the cost measured is checking the key and counting, not answering 429.
cat "$TMP/turnpike.yaml" >"$TMP/turnpike-policies.yaml"
cat >>"$TMP/turnpike-policies.yaml" <<EOF
consumers:
  - name: bench
    api_keys: [{sha256: "$(printf %s "$API_KEY" | sha256sum | cut -d' ' -f1)"}]
policies:
  - {name: keys, type: key_auth, scope: route, target: all}
  - name: limit
    type: rate_limit
    scope: route
    target: all
    config: {key: {by: application}, limits: [{requests: 1000000000, per: 1s, algorithm: sliding_window}]}
EOF
"$BIN" validate "$TMP/turnpike-policies.yaml" >&2 || die "turnpike rejected the policies config"

# The observability variants: the same route, with more and more of what observes it.
# metrics.enabled: false is the only way to run with no sink at all; the others keep the
# default metrics and expose them on a status listener, where the sink counters are read.
cat "$TMP/turnpike.yaml" >"$TMP/bare.yaml"
printf 'observability:\n  metrics: {enabled: false}\n' >>"$TMP/bare.yaml"
cat "$TMP/turnpike.yaml" >"$TMP/metrics.yaml"
printf 'observability:\n  metrics: {listen: "127.0.0.1:%s"}\n' "$STATUS_PORT" >>"$TMP/metrics.yaml"
cat "$TMP/metrics.yaml" >"$TMP/accesslog.yaml"
printf '  access_log:\n    sinks: [{type: file, name: bench-file, path: "%s"}]\n' "$TMP/access.log" >>"$TMP/accesslog.yaml"
cp "$TMP/accesslog.yaml" "$TMP/observed.yaml" # the store (call log, analytics) is a flag, below
if [[ $MODE == observe ]]; then
    for v in "${TARGETS[@]}"; do
        "$BIN" validate "$TMP/$v.yaml" >&2 || die "turnpike rejected the $v config"
    done
fi

version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]; }
if [[ $MODE == proxy ]]; then
if version_ge "$NGINX_VERSION" 1.25.1; then
    NG_H2_LISTEN="listen 127.0.0.1:$NG_H2_PORT; http2 on;"
else
    NG_H2_LISTEN="listen 127.0.0.1:$NG_H2_PORT http2;"
fi
mkdir -p "$TMP/nginx/logs"
cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes $THREADS;
worker_rlimit_nofile 65536;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    keepalive_requests 1000000;
    upstream mock {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NG_H1_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        $NG_H2_LISTEN
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
"$NGINX" -t -q -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/logs/error.log" \
    || die "nginx rejected the benchmark config"
fi

# ---------------------------------------------------------------------------------------------
# Processes.
wait_ready() { # url
    local i
    for i in $(seq 1 100); do
        if curl -sf -o /dev/null -H "X-API-Key: $API_KEY" "$1"; then return 0; fi
        sleep 0.1
    done
    die "$1 did not become ready"
}

UP_PID=
start_upstream() {
    TOKIO_WORKER_THREADS=$THREADS "$BIN" demo-upstream --listen "127.0.0.1:$UP_PORT" --name bench \
        >>"$OUT/${PREFIX}upstream.log" 2>&1 &
    UP_PID=$!
    PIDS+=("$UP_PID")
    wait_ready "http://127.0.0.1:$UP_PORT/"
}

PROXY_PID=
start_proxy() { # target
    case $1 in
    direct) PROXY_PID= ;;
    turnpike | turnpike-policies)
        TOKIO_WORKER_THREADS=$THREADS "$BIN" serve --config "$TMP/$1.yaml" --log-level warn \
            --store none >>"$OUT/${PREFIX}turnpike.log" 2>&1 &
        PROXY_PID=$!
        PIDS+=("$PROXY_PID")
        wait_ready "http://127.0.0.1:$TP_PORT/"
        ;;
    bare | metrics | accesslog)
        TOKIO_WORKER_THREADS=$THREADS "$BIN" serve --config "$TMP/$1.yaml" --log-level warn \
            --store none --admin-listen "127.0.0.1:$ADMIN_PORT" >>"$OUT/${PREFIX}turnpike.log" 2>&1 &
        PROXY_PID=$!
        PIDS+=("$PROXY_PID")
        wait_ready "http://127.0.0.1:$TP_PORT/"
        ;;
    observed)
        # A fresh embedded store per run, so every run starts from an empty call log.
        rm -rf "$TMP/data"
        TOKIO_WORKER_THREADS=$THREADS "$BIN" serve --config "$TMP/$1.yaml" --log-level warn \
            --data-dir "$TMP/data" --admin-listen "127.0.0.1:$ADMIN_PORT" \
            >>"$OUT/${PREFIX}turnpike.log" 2>&1 &
        PROXY_PID=$!
        PIDS+=("$PROXY_PID")
        wait_ready "http://127.0.0.1:$TP_PORT/"
        ;;
    nginx)
        "$NGINX" -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/logs/error.log" \
            >>"$OUT/nginx.log" 2>&1 &
        PROXY_PID=$!
        PIDS+=("$PROXY_PID")
        wait_ready "http://127.0.0.1:$NG_H1_PORT/"
        ;;
    esac
}

stop_proxy() {
    if [[ -n $PROXY_PID ]]; then stop_pid "$PROXY_PID"; fi
    PROXY_PID=
}

url_for() { # target proto
    case $1/$2 in
    direct/*) echo "http://127.0.0.1:$UP_PORT/" ;;
    turnpike/* | turnpike-policies/* | bare/* | metrics/* | accesslog/* | observed/*)
        echo "http://127.0.0.1:$TP_PORT/" ;;
    nginx/h1) echo "http://127.0.0.1:$NG_H1_PORT/" ;;
    nginx/h2) echo "http://127.0.0.1:$NG_H2_PORT/" ;;
    esac
}

# The proxy's processes: Turnpike is one process; nginx is the master and its workers.
proxy_pids() {
    [[ -n $PROXY_PID ]] || return 0
    echo "$PROXY_PID"
    pgrep -P "$PROXY_PID" || true
}

cpu_ticks() { # pids... -> utime+stime summed (clock ticks)
    local total=0 pid t
    for pid in "$@"; do
        [[ -r /proc/$pid/stat ]] || continue
        # Fields after "(comm) ": state is field 3, utime 14, stime 15.
        t=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
        total=$((total + t))
    done
    echo "$total"
}

peak_rss_kb() { # pids... -> VmHWM summed (kB)
    local total=0 pid k
    for pid in "$@"; do
        k=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${k:-0}))
    done
    echo "$total"
}

# ---------------------------------------------------------------------------------------------
# Load generators. Each prints "rps p50_ms p99_ms requests errors" on stdout.
to_ms() { # wrk latency value with unit -> ms
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

run_wrk() { # url seconds rawfile
    wrk -t"$LOADGEN_THREADS" -c"$H1_CONNS" -d"$2"s --latency -H "X-API-Key: $API_KEY" "$1" >"$3" 2>&1 || true
    local rps p50 p99 reqs errs
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$3")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$3")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$3")")
    reqs=$(awk '/requests in/ {print $1}' "$3")
    errs=$(awk '/Non-2xx or 3xx responses:/ {n += $NF}
                /Socket errors:/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10}
                END {print n + 0}' "$3")
    echo "${rps:-0} ${p50:-0} ${p99:-0} ${reqs:-0} ${errs:-0}"
}

# h2load prints no percentiles, so every request's duration goes to --log-file and the
# percentiles are computed from that (nearest rank).
h2load_summary() { # rawfile logfile
    local rps reqs errs pct
    rps=$(awk '/^finished in/ {gsub(/,/, ""); print $4}' "$1")
    # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    reqs=$(awk '/^requests:/ {gsub(/,/, ""); print $6}' "$1")
    # failed requests plus 4xx/5xx answers ("status codes: N 2xx, N 3xx, N 4xx, N 5xx")
    errs=$(awk '/^requests:/ {gsub(/,/, ""); n += $10}
                /^status codes:/ {gsub(/,/, ""); n += $7 + $9}
                END {print n + 0}' "$1")
    pct=$(cut -f3 "$2" | sort -n | awk '{v[NR] = $1}
        END {
            if (NR == 0) { print "0 0"; exit }
            i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; if (i50 < 1) i50 = 1
            i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++; if (i99 < 1) i99 = 1
            printf "%.3f %.3f", v[i50] / 1000, v[i99] / 1000 }')
    rm -f "$2"
    echo "${rps:-0} $pct ${reqs:-0} $errs"
}

run_h2load() { # url seconds rawfile [extra args...]
    local url=$1 secs=$2 raw=$3
    shift 3
    h2load -t"$LOADGEN_THREADS" -D "$secs" --log-file="$TMP/h2load.log" -H "X-API-Key: $API_KEY" "$@" "$url" >"$raw" 2>&1 || true
    h2load_summary "$raw" "$TMP/h2load.log"
}

h2_sat_args() { echo -c"$H2_CONNS" -m"$H2_STREAMS"; }

# ---------------------------------------------------------------------------------------------
# One measured run: fresh proxy, warm-up, then the run with CPU and peak RSS of the proxy.
printf 'phase\tround\tproto\ttarget\trate\trps\tp50_ms\tp99_ms\trequests\terrors\tproxy_cpu_s\tproxy_rss_kb\tupstream_cpu_s\tloadavg1\n' >"$RESULTS"

measure() { # phase round proto target [rate]
    local phase=$1 round=$2 proto=$3 target=$4 rate=${5:-0}
    local url raw pids c0 c1 u0 u1 res cpu_s rss up_s load
    url=$(url_for "$target" "$proto")
    raw="$OUT/${PREFIX}${phase}-r${round}-${proto}-${target}.txt"
    start_proxy "$target"

    # Warm-up (same tool and shape as the measured run; results discarded).
    if [[ $phase == sat && $proto == h1 ]]; then
        run_wrk "$url" "$WARMUP" "$TMP/warmup.txt" >/dev/null
    elif [[ $phase == sat ]]; then
        # shellcheck disable=SC2046
        run_h2load "$url" "$WARMUP" "$TMP/warmup.txt" $(h2_sat_args) >/dev/null
    fi

    mapfile -t pids < <(proxy_pids)
    load=$(cut -d' ' -f1 /proc/loadavg)
    c0=$(cpu_ticks "${pids[@]}")
    u0=$(cpu_ticks "$UP_PID")
    case $phase/$proto in
    sat/h1) res=$(run_wrk "$url" "$DURATION" "$raw") ;;
    # shellcheck disable=SC2046
    sat/h2) res=$(run_h2load "$url" "$DURATION" "$raw" $(h2_sat_args)) ;;
    half/h1)
        run_h2load "$url" "$WARMUP" "$TMP/warmup.txt" --h1 -c"$HALF_H1_CONNS" \
            --rps="$(per_client "$rate" "$HALF_H1_CONNS")" >/dev/null
        c0=$(cpu_ticks "${pids[@]}"); u0=$(cpu_ticks "$UP_PID")
        res=$(run_h2load "$url" "$DURATION" "$raw" --h1 -c"$HALF_H1_CONNS" \
            --rps="$(per_client "$rate" "$HALF_H1_CONNS")")
        ;;
    half/h2)
        run_h2load "$url" "$WARMUP" "$TMP/warmup.txt" -c"$H2_CONNS" -m"$H2_STREAMS" \
            --rps="$(per_client "$rate" "$H2_CONNS")" >/dev/null
        c0=$(cpu_ticks "${pids[@]}"); u0=$(cpu_ticks "$UP_PID")
        res=$(run_h2load "$url" "$DURATION" "$raw" -c"$H2_CONNS" -m"$H2_STREAMS" \
            --rps="$(per_client "$rate" "$H2_CONNS")")
        ;;
    esac
    c1=$(cpu_ticks "${pids[@]}")
    u1=$(cpu_ticks "$UP_PID")
    if ((${#pids[@]})); then
        rss=$(peak_rss_kb "${pids[@]}")
        cpu_s=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / t}')
    else
        rss=0
        cpu_s=0
    fi
    up_s=$(awk -v a="$u0" -v b="$u1" -v t="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / t}')
    if [[ $MODE == observe && $target != bare ]]; then record_sinks "$round" "$proto" "$target"; fi
    stop_proxy
    rm -f "$TMP/access.log"*

    read -r rps p50 p99 reqs errs <<<"$res"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$round" "$proto" \
        "$target" "$rate" "$rps" "$p50" "$p99" "$reqs" "$errs" "$cpu_s" "$rss" "$up_s" "$load" >>"$RESULTS"
    log "$(printf '%-4s r%s %s %-8s %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  cpu %6.2f s  rss %6d kB  errors %s' \
        "$phase" "$round" "$proto" "$target" "$rps" "$p50" "$p99" "$cpu_s" "$rss" "$errs")"
}

per_client() { # total_rate clients -> per-client rate (at least 1)
    awk -v r="$1" -v c="$2" 'BEGIN {v = int(r / c + 0.5); if (v < 1) v = 1; print v}'
}

rotated_targets() { # round -> the three targets, rotated so no target always runs first
    local r=$1 i n=${#TARGETS[@]}
    for ((i = 0; i < n; i++)); do echo "${TARGETS[$(((i + r) % n))]}"; done
}

# Every target, every protocol, REPEATS rounds, closed loop; targets rotated per round.
saturation_rounds() {
    local r proto target
    for ((r = 1; r <= REPEATS; r++)); do
        for proto in "${PROTOS[@]}"; do
            while read -r target; do
                measure sat "$r" "$proto" "$target"
            done < <(rotated_targets "$r")
        done
    done
}

# Waits (up to 30 s) for the call-log and access-log queues to empty, then appends what each
# sink delivered, and the requests the gateway counted, to $SINKS. Analytics is left out: it
# keeps the current minute in memory by design.
record_sinks() { # round proto target
    local metrics i
    for i in $(seq 1 300); do
        metrics=$(curl -sf "http://127.0.0.1:$STATUS_PORT/metrics") || die "no /metrics on $STATUS_PORT"
        if ! awk '/^turnpike_observability_sink_queued\{/ && !/kind="rollups"/ && $NF + 0 > 0 {busy = 1} END {exit !busy}' <<<"$metrics"; then
            break
        fi
        sleep 0.1
    done
    awk -v r="$1" -v pr="$2" -v tg="$3" '
        /^turnpike_http_requests_total\{/ { req += $NF }
        /^turnpike_observability_sink_records_total\{/ && !/kind="rollups"/ {
            match($0, /sink="[^"]*"/); sink = substr($0, RSTART + 6, RLENGTH - 7)
            match($0, /outcome="[^"]*"/); outcome = substr($0, RSTART + 9, RLENGTH - 10)
            if (!(sink in seen)) { seen[sink] = 1; order[++n] = sink }
            v[sink, outcome] = $NF }
        END { for (i = 1; i <= n; i++) { s = order[i]
            printf "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\n", r, pr, tg, s, req, v[s, "sent"], v[s, "dropped"], v[s, "failed"] } }' \
        <<<"$metrics" >>"$SINKS"
}

if [[ $MODE == observe ]]; then
    printf 'round\tproto\ttarget\tsink\trequests\tsent\tdropped\tfailed\n' >"$SINKS"
    log "turnpike $BIN; $THREADS threads; ports upstream $UP_PORT turnpike $TP_PORT status $STATUS_PORT"
    log "plan: $REPEATS round(s) x {h1, h2} x {${TARGETS[*]}}, ${WARMUP}s warm-up + ${DURATION}s each"
    start_upstream
    for target in "${TARGETS[@]}"; do
        start_proxy "$target"
        code=$(curl -s -o /dev/null -w '%{http_code}' "$(url_for "$target" h1)")
        [[ $code == 200 ]] || die "$target did not answer 200 (got $code)"
        stop_proxy
    done
    saturation_rounds
    stop_pid "$UP_PID"
    report_observe
    log "done; raw outputs in $OUT"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
log "turnpike $BIN; nginx $NGINX_VERSION; $THREADS threads; ports upstream $UP_PORT turnpike $TP_PORT nginx $NG_H1_PORT/$NG_H2_PORT"
log "plan: $REPEATS round(s) x {h1 wrk -c$H1_CONNS, h2 h2load -c$H2_CONNS -m$H2_STREAMS} x {${TARGETS[*]}}, ${WARMUP}s warm-up + ${DURATION}s each, then the half-load runs"
start_upstream

# Sanity: every target answers 200 over both protocols before anything is measured.
for target in "${TARGETS[@]}"; do
    start_proxy "$target"
    for proto in "${PROTOS[@]}"; do
        url=$(url_for "$target" "$proto")
        if [[ $proto == h1 ]]; then
            code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $API_KEY" "$url")
        else
            code=$(h2load -n1 -c1 -H "X-API-Key: $API_KEY" "$url" 2>&1 | awk '/^status codes:/ {gsub(/,/, ""); print ($3 == 1) ? 200 : 0}')
        fi
        [[ $code == 200 ]] || die "$target over $proto did not answer 200 (got $code) at $url"
    done
    stop_proxy
done
# And the policies are really on: without the key, 401.
start_proxy turnpike-policies
code=$(curl -s -o /dev/null -w '%{http_code}' "$(url_for turnpike-policies h1)")
[[ $code == 401 ]] || die "turnpike-policies answered $code without an API key (expected 401)"
stop_proxy
log "sanity check passed: every target answers 200 over h1 and h2c; policies refuse a keyless request"

# Phase 1: saturation (closed loop).
saturation_rounds

# Phase 2: constant rate at half of Turnpike's saturated throughput (per protocol).
declare -A HALF_RATE
for proto in "${PROTOS[@]}"; do
    half=$(awk -v x="$(median_of sat "$proto" turnpike rps)" 'BEGIN {printf "%d", x / 2}')
    if [[ $proto == h1 ]]; then conns=$HALF_H1_CONNS; else conns=$H2_CONNS; fi
    HALF_RATE[$proto]=$(($(per_client "$half" "$conns") * conns)) # what the clients will offer
    log "half-load rate for $proto: ${HALF_RATE[$proto]} req/s"
done
for ((r = 1; r <= REPEATS; r++)); do
    for proto in "${PROTOS[@]}"; do
        while read -r target; do
            measure half "$r" "$proto" "$target" "${HALF_RATE[$proto]}"
        done < <(rotated_targets "$r")
    done
done

stop_pid "$UP_PID"

report
log "done; raw outputs in $OUT"
