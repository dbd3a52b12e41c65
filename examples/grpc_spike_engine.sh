#!/bin/sh
# usage: engine.sh start|stop DIR
set -e
DIR=${2:-/tmp/spike/engine}
BR=fdkspike0
case "$1" in
start)
  mkdir -p "$DIR"
  ip link add $BR type bridge
  ip addr add 10.253.7.1/24 dev $BR
  ip link set $BR up
  setsid dockerd --host unix://$DIR/docker.sock --data-root $DIR/data --exec-root $DIR/exec \
    --pidfile $DIR/dockerd.pid --bridge $BR --iptables=false --ip-masq=false --ip-forward=false \
    --debug </dev/null >$DIR/dockerd.log 2>&1 &
  echo $! > $DIR/launcher.pid
  for i in $(seq 600); do /usr/bin/docker -H unix://$DIR/docker.sock version --format '{{.Server.Version}}' 2>/dev/null && exit 0; sleep 0.1; done
  echo "dockerd did not answer"; exit 1;;
stop)
  kill -TERM $(cat $DIR/dockerd.pid) || true
  for i in $(seq 100); do kill -0 $(cat $DIR/dockerd.pid) 2>/dev/null || break; sleep 0.2; done
  ip link del $BR || true;;
esac
