# succeed() takes shell commands as str: check.py must reject an int.
start_all()
node1.succeed(1)
