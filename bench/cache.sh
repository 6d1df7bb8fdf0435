#!/usr/bin/env bash
# Cache hits side by side: the same cacheable URL of the demo upstream (`/cached/3600`, which
# says `Cache-Control: public, max-age=3600`) served from nginx's `proxy_cache` and from
# Turnpike's `cache` policy, with wrk (HTTP/1.1) and h2load (HTTP/2, h2c prior knowledge), in
# interleaved rounds on this machine. Every measured request is a hit: each run starts with a
# request that fills the cache, checks the second answer says HIT, and the upstream's CPU
# during the run shows it was not called.
#
# Usage:  bench/cache.sh            (needs root only to install missing tools)
# Knobs:  DURATION=12 WARMUP=3 REPEATS=3 THREADS=$(nproc) H1_CONNS=50 H2_CONNS=10
#         H2_STREAMS=10 LOADGEN_THREADS=2 TURNPIKE_BIN=... NO_DOC=1 (as in bench/run.sh)
#
# Results: bench/out/cache.tsv (one row per run), and the section of docs/BENCHMARKS.md between
# the BENCH-CACHE markers. A benchmark, not a test: CI does not run it.
set -euo pipefail

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
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
TARGETS=(nginx turnpike)
PROTOS=(h1 h2)
PATH_UNDER_TEST=/cached/3600

log() { printf '[bench-cache %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n ${KEEP_TMP:-} ]] || rm -rf "$TMP"
}
trap cleanup EXIT

need=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
if ((${#need[@]})); then
    [[ $EUID -eq 0 ]] || die "missing ${need[*]}; run as root to install them (apt-get)"
    log "installing ${need[*]}"
    created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then # no nginx service started by the package
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        created=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    ((created)) && rm -f /usr/sbin/policy-rc.d
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's|.*nginx/||')

if [[ -n ${TURNPIKE_BIN:-} ]]; then
    BIN=$TURNPIKE_BIN
    DESC="binary $BIN"
else
    log "building turnpike (release)"
    DESC="commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    (cd "$ROOT" && cargo build --release -p turnpike >&2)
    BIN="$ROOT/target/release/turnpike"
fi
mkdir -p "$OUT"
RESULTS="$OUT/cache.tsv"
CLK_TCK=$(getconf CLK_TCK)
ulimit -n 65536 2>/dev/null || true

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { local p=$1; while port_in_use "$p"; do p=$((p + 1)); done; echo "$p"; }
UP_PORT=$(free_port 19181)
TP_PORT=$(free_port $((UP_PORT + 1)))
NG_H1_PORT=$(free_port $((TP_PORT + 1)))
NG_H2_PORT=$(free_port $((NG_H1_PORT + 1)))

cat >"$TMP/turnpike.yaml" <<EOF
server:
  listeners: [{name: bench, address: "127.0.0.1:$TP_PORT"}]
  drain_timeout: 1s
upstreams:
  - {name: mock, targets: [{address: "127.0.0.1:$UP_PORT"}]}
routes:
  - {name: all, paths: [{prefix: /}], upstream: mock}
policies:
  - {name: cache, type: cache, scope: route, target: all}
observability:
  metrics: {enabled: false}
EOF
"$BIN" validate "$TMP/turnpike.yaml" >&2 || die "turnpike rejected the config"

if [[ "$(printf '%s\n%s\n' "$NGINX_VERSION" 1.25.1 | sort -V | head -1)" == 1.25.1 ]]; then
    NG_H2_LISTEN="listen 127.0.0.1:$NG_H2_PORT; http2 on;"
else
    NG_H2_LISTEN="listen 127.0.0.1:$NG_H2_PORT http2;"
fi
mkdir -p "$TMP/nginx/logs" "$TMP/nginx/cache"
NG_LOCATION='proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_cache bench; proxy_cache_lock on; add_header X-Cache $upstream_cache_status;'

# As root, nginx's workers would run as nobody, who cannot write the cache files under a
# private temporary directory.
NG_USER=
[[ $EUID -eq 0 ]] && NG_USER="user root;"
cat >"$TMP/nginx/nginx.conf" <<EOF
$NG_USER
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
    proxy_cache_path $TMP/nginx/cache levels=1:2 keys_zone=bench:64m max_size=256m inactive=1h;
    upstream mock { server 127.0.0.1:$UP_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$NG_H1_PORT;
        location / { $NG_LOCATION }
    }
    server {
        $NG_H2_LISTEN
        location / { $NG_LOCATION }
    }
}
EOF
"$NGINX" -t -q -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/logs/error.log" \
    || die "nginx rejected its config"

wait_ready() { # url [curl flags...]
    local i url=$1
    shift
    for i in $(seq 1 100); do curl -sf -o /dev/null "$@" "$url" && return 0; sleep 0.1; done
    die "$url did not become ready"
}
TOKIO_WORKER_THREADS=$THREADS "$BIN" demo-upstream --listen "127.0.0.1:$UP_PORT" --name bench \
    >"$OUT/cache-upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_ready "http://127.0.0.1:$UP_PORT/"

PROXY_PID=
start_proxy() {
    case $1 in
    turnpike)
        TOKIO_WORKER_THREADS=$THREADS "$BIN" serve --config "$TMP/turnpike.yaml" --log-level warn \
            --store none >>"$OUT/cache-turnpike.log" 2>&1 &
        PROXY_PID=$!
        ;;
    nginx)
        rm -rf "$TMP/nginx/cache" && mkdir -p "$TMP/nginx/cache"
        "$NGINX" -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/logs/error.log" &
        PROXY_PID=$!
        ;;
    esac
    PIDS+=("$PROXY_PID")
}
stop_proxy() {
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=
}
url_for() { # target proto
    case $1/$2 in
    turnpike/*) echo "http://127.0.0.1:$TP_PORT$PATH_UNDER_TEST" ;;
    nginx/h1) echo "http://127.0.0.1:$NG_H1_PORT$PATH_UNDER_TEST" ;;
    nginx/h2) echo "http://127.0.0.1:$NG_H2_PORT$PATH_UNDER_TEST" ;;
    esac
}
cpu_ticks() {
    local total=0 pid t
    for pid in "$@"; do
        [[ -r /proc/$pid/stat ]] || continue
        t=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
        total=$((total + t))
    done
    echo "$total"
}
to_ms() {
    awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; printf "%.3f", n }'
}
run_wrk() { # url seconds raw -> "rps p50 p99 requests errors"
    wrk -t"$LOADGEN_THREADS" -c"$H1_CONNS" -d"$2"s --latency "$1" >"$3" 2>&1 || true
    echo "$(awk '/^Requests\/sec:/ {print $2}' "$3") $(to_ms "$(awk '$1 == "50%" {print $2}' "$3")")" \
        "$(to_ms "$(awk '$1 == "99%" {print $2}' "$3")") $(awk '/requests in/ {print $1}' "$3")" \
        "$(awk '/Non-2xx or 3xx responses:/ {n += $NF} /Socket errors:/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' "$3")"
}
run_h2load() { # url seconds raw
    h2load -t"$LOADGEN_THREADS" -c"$H2_CONNS" -m"$H2_STREAMS" -D "$2" --log-file="$TMP/h2.log" "$1" >"$3" 2>&1 || true
    local pct
    pct=$(cut -f3 "$TMP/h2.log" | sort -n | awk '{v[NR] = $1} END { if (NR == 0) { print "0 0"; exit }
        i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
        printf "%.3f %.3f", v[i50] / 1000, v[i99] / 1000 }')
    rm -f "$TMP/h2.log"
    echo "$(awk '/^finished in/ {gsub(/,/, ""); print $4}' "$3") $pct $(awk '/^requests:/ {gsub(/,/, ""); print $6}' "$3")" \
        "$(awk '/^requests:/ {gsub(/,/, ""); n += $10} /^status codes:/ {gsub(/,/, ""); n += $7 + $9} END {print n + 0}' "$3")"
}

printf 'round\tproto\ttarget\trps\tp50_ms\tp99_ms\trequests\terrors\tproxy_cpu_s\tupstream_cpu_s\n' >"$RESULTS"
measure() { # round proto target
    local url pids c0 c1 u0 u1 res x
    url=$(url_for "$3" "$2")
    start_proxy "$3"
    local flags=()
    [[ $2 == h2 ]] && flags=(--http2-prior-knowledge)
    wait_ready "$url" "${flags[@]}"
    x=$(curl -s -o /dev/null -D - "${flags[@]}" "$url" | awk -F': *' 'tolower($1) == "x-cache" {print $2}' | tr -d '\r')
    [[ $x == HIT ]] || die "$3: the second request was not a hit (X-Cache: ${x:-none})"
    if [[ $2 == h1 ]]; then run_wrk "$url" "$WARMUP" "$TMP/w.txt" >/dev/null; else run_h2load "$url" "$WARMUP" "$TMP/w.txt" >/dev/null; fi
    mapfile -t pids < <(echo "$PROXY_PID"; pgrep -P "$PROXY_PID" || true)
    c0=$(cpu_ticks "${pids[@]}"); u0=$(cpu_ticks "$UP_PID")
    if [[ $2 == h1 ]]; then
        res=$(run_wrk "$url" "$DURATION" "$OUT/cache-r$1-$2-$3.txt")
    else
        res=$(run_h2load "$url" "$DURATION" "$OUT/cache-r$1-$2-$3.txt")
    fi
    c1=$(cpu_ticks "${pids[@]}"); u1=$(cpu_ticks "$UP_PID")
    stop_proxy
    read -r rps p50 p99 reqs errs <<<"$res"
    local cpu up
    cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / t}')
    up=$(awk -v a="$u0" -v b="$u1" -v t="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / t}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$rps" "$p50" "$p99" "$reqs" "$errs" "$cpu" "$up" >>"$RESULTS"
    log "$(printf 'r%s %s %-8s %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  cpu %6.2f s  upstream cpu %5.2f s  errors %s' \
        "$1" "$2" "$3" "$rps" "$p50" "$p99" "$cpu" "$up" "$errs")"
}

log "plan: $REPEATS round(s) x {h1, h2} x {${TARGETS[*]}}, ${WARMUP}s warm-up + ${DURATION}s each; nginx $NGINX_VERSION"
for ((r = 1; r <= REPEATS; r++)); do
    for proto in "${PROTOS[@]}"; do
        if ((r % 2)); then order=(nginx turnpike); else order=(turnpike nginx); fi
        for t in "${order[@]}"; do measure "$r" "$proto" "$t"; done
    done
done

# Medians per (proto, target) and the table.
median() { # proto target column
    awk -F'\t' -v pr="$1" -v tg="$2" -v col="$3" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
        $2 == pr && $3 == tg { v[++n] = $c }
        END { for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] + 0 > x + 0) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
              if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }' "$RESULTS"
}
cpu10k() { # proto target
    awk -F'\t' -v pr="$1" -v tg="$2" 'NR > 1 && $2 == pr && $3 == tg && $7 > 0 { v[++n] = $9 / $7 * 10000 }
        END { for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
              if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }' "$RESULTS"
}
TABLE="$OUT/cache-table.md"
{
    echo "Generated by \`bench/cache.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), Turnpike $DESC, nginx $NGINX_VERSION."
    echo
    echo "- Machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo); load generator, proxies and upstream share them."
    echo "- \`GET $PATH_UNDER_TEST\` of the demo upstream (\`Cache-Control: public, max-age=3600\`, 70-byte JSON body): nginx \`proxy_cache\`"
    echo "  (keys zone in shared memory, body in its cache file, \`$THREADS\` workers) against Turnpike's \`cache\` policy (memory tier,"
    echo "  $THREADS worker threads, metrics off). Every run starts a fresh proxy, fills its cache with one request, checks the"
    echo "  next says \`X-Cache: HIT\`, warms up ${WARMUP}s, then measures ${DURATION}s; $REPEATS rounds, order alternated; medians."
    echo "- HTTP/1.1 \`wrk -t$LOADGEN_THREADS -c$H1_CONNS\`; HTTP/2 \`h2load -t$LOADGEN_THREADS -c$H2_CONNS -m$H2_STREAMS\`."
    echo
    echo "| Protocol | Proxy | Requests/s (min–max) | p50 ms | p99 ms | CPU s / 10k req | Upstream CPU s in the run | Errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for proto in "${PROTOS[@]}"; do
        for t in "${TARGETS[@]}"; do
            range=$(awk -F'\t' -v pr="$proto" -v tg="$t" 'NR > 1 && $2 == pr && $3 == tg { if (mn == "" || $4 + 0 < mn) mn = $4 + 0; if ($4 + 0 > mx) mx = $4 + 0 } END {printf "%.0f–%.0f", mn, mx}' "$RESULTS")
            errs=$(awk -F'\t' -v pr="$proto" -v tg="$t" 'NR > 1 && $2 == pr && $3 == tg {n += $8} END {print n + 0}' "$RESULTS")
            printf '| %s | %s | %.0f (%s) | %.3f | %.3f | %.3f | %s | %s |\n' "$proto" "$t" "$(median "$proto" "$t" rps)" "$range" \
                "$(median "$proto" "$t" p50_ms)" "$(median "$proto" "$t" p99_ms)" "$(cpu10k "$proto" "$t")" "$(median "$proto" "$t" upstream_cpu_s)" "$errs"
        done
    done
    echo
    for proto in "${PROTOS[@]}"; do
        awk -v pr="$proto" -v a="$(median "$proto" turnpike rps)" -v b="$(median "$proto" nginx rps)" \
            -v ca="$(cpu10k "$proto" turnpike)" -v cb="$(cpu10k "$proto" nginx)" \
            'BEGIN {printf "- %s: Turnpike %.2f× nginx throughput (target ≥ 1: %s), CPU per request %.2f× nginx.\n", pr, a / b, (a >= b) ? "met" : "NOT met", ca / cb}'
    done
} >"$TABLE"
cat "$TABLE" >&2
if [[ -z ${NO_DOC:-} ]]; then
    if ! grep -q '<!-- BENCH-CACHE:BEGIN' "$DOC"; then
        printf '\n## Cache hits: Turnpike against nginx proxy_cache\n\n<!-- BENCH-CACHE:BEGIN (generated by bench/cache.sh; edits inside are overwritten) -->\n<!-- BENCH-CACHE:END -->\n' >>"$DOC"
    fi
    awk -v table="$TABLE" -v b="<!-- BENCH-CACHE:BEGIN" -v e="<!-- BENCH-CACHE:END -->" '
        index($0, b) == 1 { print; while ((getline line < table) > 0) print line; skip = 1; next }
        index($0, e) == 1 { skip = 0 }
        !skip { print }' "$DOC" >"$TMP/doc.new"
    cp "$TMP/doc.new" "$DOC"
    log "updated $DOC"
fi
