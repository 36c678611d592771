# node4 is not a node of the test: check.py must reject it.
start_all()
node4.succeed("x")
