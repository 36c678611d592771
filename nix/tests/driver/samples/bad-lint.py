# Type-correct, but an f-string without placeholders is pyflakes' F541: ruff (nixpkgs'
# `ruff check --select F`) must reject it while ty accepts it.
start_all()
node1.succeed(f"systemctl is-active blixard")
