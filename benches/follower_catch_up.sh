#!/usr/bin/env bash
# Cluster mode: how long a follower that was down takes to catch up
# (docs/BENCHMARKS.md). Three nodes, fsync = "always", default Raft
# timeouts; `weir bench throughput` fills one RF 3 partition with MESSAGES
# x 1 KiB; a follower is killed (SIGKILL) once it holds a fifth of them and
# started again once the bench is done; the time from its start until its
# `weir channels` line equals the leader's is printed, with the segment
# transfer metrics of the follower. MODE=copy sets raft_log_entries_max =
# 4096 (the leader purges its Raft log past the follower, which catches up
# by segment transfer); MODE=raftlog keeps the default (it catches up from
# the Raft log). RATE=BYTES sets max_segment_transfer_bytes_per_sec on
# every node. Needs `cargo build --release`, curl, bc, and ports
# 7510-7532 free.
# Usage: MODE=copy MESSAGES=2097152 benches/follower_catch_up.sh
set -u
MODE=${MODE:-copy}; N=${MESSAGES:-2097152}
# Every wait below gives up after this many seconds.
LIMIT=${LIMIT:-1200}
waited() { [ $SECONDS -lt $LIMIT ] || { echo "gave up after $LIMIT s" >&2; exit 1; }; sleep ${1:-0.1}; }
W=${W:-$(dirname "$0")/../target/release/weir}
D=$(mktemp -d)
trap 'pkill -f "weir serve --config $D" ; rm -rf "$D"' EXIT
for n in 1 2 3; do
  extra=""
  [ "$MODE" = copy ] && extra="raft_log_entries_max = 4096"
  [ -n "${RATE:-}" ] && extra="$extra
max_segment_transfer_bytes_per_sec = $RATE"
  cat > $D/node$n.toml <<T
listen_addr = "127.0.0.1:75${n}0"
data_dir = "$D/data/node$n"
metrics_addr = "127.0.0.1:75${n}2"
fsync = "always"
[cluster]
node_id = $n
listen_addr = "127.0.0.1:75${n}1"
$extra
T
  for m in 1 2 3; do printf '[[cluster.nodes]]\nid = %s\ncluster_addr = "127.0.0.1:75%s1"\nclient_addr = "127.0.0.1:75%s0"\n' $m $m $m >> $D/node$n.toml; done
done
start() { RUST_LOG=info,openraft=warn setsid $W serve --config $D/node$1.toml >> $D/node$1.log 2>&1 & echo $! > $D/node$1.pid; }
for n in 1 2 3; do start $n; done
until $W cluster status --node 127.0.0.1:7511 2>/dev/null | grep -q leader; do waited 0.5; done
$W bench throughput --addr 127.0.0.1:7510 --cluster 127.0.0.1:7511 --replication-factor 3 \
  --sizes 1024 --messages $N --bytes-max $((N * 1024)) > $D/bench.out 2>&1 &
BENCH=$!
until CH=$($W metadata --addr 127.0.0.1:7510 2>/dev/null | awk '/^bench-/{print $1; exit}') && [ -n "$CH" ]; do waited; done
# The leader column reads "-" until the partition's group has elected.
until L=$($W metadata $CH --addr 127.0.0.1:7510 | awk -v ch="$CH" '$1==ch{print $4}') && [[ $L =~ ^[0-9]+$ ]]; do waited; done
F=$(( L % 3 + 1 ))
next_offset() { $W channels --addr 127.0.0.1:75${1}0 2>/dev/null | awk -v ch="$CH" '$1==ch{print $4}'; }
until [ "$(next_offset $F)" -ge $((N / 5)) ] 2>/dev/null; do waited 0.05; done
kill -9 $(cat $D/node$F.pid)
echo "mode $MODE${RATE:+, rate $RATE B/s}: follower node $F killed at offset $(next_offset $L) on the leader (node $L)"
wait $BENCH; grep -A1 '^size' $D/bench.out
echo "follower's partition on disk before its restart: $(du -sb $D/data/node$F/channels | cut -f1) bytes"
sleep 3
T0=$(date +%s.%N); start $F
until [ "$($W channels --addr 127.0.0.1:75${F}0 2>/dev/null | grep $CH)" = "$($W channels --addr 127.0.0.1:75${L}0 | grep $CH)" ]; do waited; done
T1=$(date +%s.%N)
echo "follower caught up in $(echo "$T1 - $T0" | bc) s from its start"
$W channels --addr 127.0.0.1:75${F}0 | grep $CH
curl -s 127.0.0.1:75${F}2/metrics | grep -E "^weir_segment_transfer" || echo "no segment transfer"
