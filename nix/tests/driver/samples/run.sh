#!/bin/sh
# Runs check.py on the samples: good.py must pass (0), each bad-*.py must fail (1);
# bad-lint.py must fail through ruff alone (ty accepts it).
# Exits 3 (as check.py does) when ty or ruff is not installed, 1 when any sample misbehaves.
cd "$(dirname "$0")/.." || exit 1
status=0
python3 check.py --nodes node1,node2,node3 samples/good.py | head -1 | sed 's/^/info /'
for f in samples/good.py samples/bad-*.py; do
  out=$(python3 check.py --nodes node1,node2,node3 "$f")
  rc=$?
  [ "$rc" = 3 ] && { echo "$out"; echo "samples: NOT checked"; exit 3; }
  case "$f" in */good.py) want=0 ;; *) want=1 ;; esac
  why=$(printf '%s\n' "$out" | sed -n 's/^check\.py: [^:]*: \(ty\|ruff\): FAILED.*/\1/p' | tr '\n' ' ')
  if [ "$rc" = "$want" ]; then echo "ok   $f (exit $rc${why:+; rejected by: $why})"; else echo "FAIL $f (exit $rc, want $want)"; echo "$out"; status=1; fi
  case "$f" in
    */bad-lint.py)
      if [ "$why" != "ruff " ]; then echo "FAIL $f: want a rejection by ruff alone, got: ${why:-none}"; status=1; fi ;;
  esac
done
exit $status
