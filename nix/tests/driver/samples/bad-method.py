# Machine objects have no such method: check.py must reject it.
start_all()
node1.no_such_method()
