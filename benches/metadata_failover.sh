#!/usr/bin/env bash
# Cluster mode: metadata-group failover on one machine (docs/BENCHMARKS.md):
# three nodes with the default Raft timeouts; the leader is killed with
# SIGKILL, the others are polled (`weir cluster status`) until both name a
# new leader; the killed node is restarted; repeated ROUNDS times. Prints
# one line per round, in ms. Needs `cargo build --release` and ports
# 17501-17503 and 17601-17603 free.
set -u
W=${W:-$(dirname "$0")/../target/release/weir}
ROUNDS=${ROUNDS:-10}
D=$(mktemp -d)
for n in 1 2 3; do
cat > $D/n$n.toml <<T
listen_addr = "127.0.0.1:1750$n"
metrics_addr = ""
data_dir = "$D/data$n"
[cluster]
node_id = $n
listen_addr = "127.0.0.1:1760$n"
[[cluster.nodes]]
id = 1
cluster_addr = "127.0.0.1:17601"
client_addr = "127.0.0.1:17501"
[[cluster.nodes]]
id = 2
cluster_addr = "127.0.0.1:17602"
client_addr = "127.0.0.1:17502"
[[cluster.nodes]]
id = 3
cluster_addr = "127.0.0.1:17603"
client_addr = "127.0.0.1:17503"
T
done
declare -A PID
start() { setsid $W serve --config $D/n$1.toml > $D/n$1.log 2>&1 & PID[$1]=$!; }
leader_of() { $W cluster status --json --node 127.0.0.1:1760$1 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["leader"] if d["leader"] is not None else "none", d["term"])' 2>/dev/null; }
for n in 1 2 3; do start $n; done
sleep 4
for r in $(seq 1 $ROUNDS); do
  read L T < <(leader_of 1)
  [ "$L" = "none" ] && { sleep 1; continue; }
  others=$(echo 1 2 3 | tr ' ' '\n' | grep -v "^$L$")
  t0=$(date +%s%N)
  kill -9 ${PID[$L]}
  while :; do
    ok=1
    for o in $others; do read l t < <(leader_of $o); if [ "$l" = "none" ] || [ "$l" = "$L" ]; then ok=0; fi; done
    [ $ok = 1 ] && break
    sleep 0.02
  done
  t1=$(date +%s%N)
  echo "round $r: leader $L killed in term $T; new leader after $(( (t1-t0)/1000000 )) ms"
  start $L; sleep 3
done
for n in 1 2 3; do kill ${PID[$n]} 2>/dev/null; done
wait 2>/dev/null
rm -rf "$D"
