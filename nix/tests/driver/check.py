#!/usr/bin/env python3
"""Check a NixOS test script the way nixpkgs does before it runs a test.

    check.py --nodes node1,node2,node3 SCRIPT.py [--name TESTNAME] [--vlans 1] [--mypy]

Since nixpkgs PR #509615 (2026-04), nixos/lib/testing/driver.nix builds one file,
`testScriptWithTypes` = nixos/lib/test-script-prepend.py + one line binding every node
(`<name> = create_fake_qemu_machine()`), one for containers, the vlans, then the script, and
  - type-checks it with `ty` (unless the test sets skipTypeCheck), and
  - lints the same file with `ruff check --select F` (the pyflakes rules; unless skipLint).
This does both with ./prepend-ty.py and the typed stubs in ./stubs (a search path for ty) and
reports the findings at the script's own line numbers. `--mypy` also runs the check nixpkgs
ran before that PR (mypy, ./prepend.py). See README.md for what was verified and what is assumed.

Exit status: 0 clean; 1 findings; 2 a checker failed to run (crash, bad usage);
3 a checker is not installed (nothing was checked); 64 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"
PREPEND_TY = HERE / "prepend-ty.py"  # ty/ruff era (nixpkgs PR #509615 and later)
PREPEND_MYPY = HERE / "prepend.py"  # mypy era (before it)

# nixpkgs' name for the combined file; every checker prints it in its messages.
COMBINED = "testScriptWithTypes"

# The rules nixpkgs lints test scripts with: F, ruff's port of pyflakes (PR #509615:
# the default set would add pycodestyle style rules).
RUFF_SELECT = "F"
# The flags nixos/lib/testing/driver.nix passed to mypy before PR #509615.
NIXPKGS_MYPY_FLAGS = ["--no-implicit-optional", "--pretty", "--no-color-output"]
# python3 of nixpkgs at the project's pin (assumed, see README.md): what ty targets.
DEFAULT_PYTHON_VERSION = "3.13"

MISSING_TY_RUFF = "check.py: ty/ruff not installed (pip install ty ruff): NOT checked"
MISSING_MYPY = "check.py: mypy not installed (pip install mypy): NOT checked"


def pythonize_name(name: str) -> str:
    """driver.nix's pythonizeName: a first character outside [A-z_] and any later one outside
    [A-z0-9_] become "_". (`A-z` is what nixpkgs wrote; it also admits [ \\ ] ^ ` .)"""
    if not name:
        return name
    head = name[0] if re.fullmatch(r"[A-z_]", name[0]) else "_"
    tail = "".join(c if re.fullmatch(r"[A-z0-9_]", c) else "_" for c in name[1:])
    return head + tail


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def vm_names(nodes: list[str], containers: list[str]) -> list[str]:
    names = list(nodes)
    # theOnlyMachine: a test with exactly one node also gets it as `machine`.
    if len(nodes) == 1 and "machine" not in nodes + containers:
        names.append("machine")
    return [pythonize_name(n) for n in names]


def read_prepend(path: Path) -> str:
    text = path.read_text()
    return text if text.endswith("\n") else text + "\n"


def ty_prelude(nodes: list[str], containers: list[str], vlans: list[int]) -> str:
    """What goes before the script for ty and ruff: the prepend, then the machines and vlans
    bound to values (ruff treats a name that is only annotated as undefined)."""
    vm_line = " ".join(f"{n} = create_fake_qemu_machine();" for n in vm_names(nodes, containers))
    container_line = " ".join(f"{pythonize_name(n)} = create_fake_nspawn_machine();" for n in containers)
    vlan_lines = "\n".join(f"vlan{v} = create_fake_vlan()" for v in vlans)
    return f"{read_prepend(PREPEND_TY)}{vm_line}\n{container_line}\n{vlan_lines}\n"


def mypy_prelude(nodes: list[str], containers: list[str], vlans: list[int]) -> str:
    """What driver.nix put before the script for mypy (before PR #509615): annotations only."""
    vm_line = " ".join(f"{n}: QemuMachine;" for n in vm_names(nodes, containers))
    container_line = " ".join(f"{pythonize_name(n)}: NspawnMachine;" for n in containers)
    vlan_lines = "\n".join(f"vlan{v}: VLan" for v in vlans)
    return f"{read_prepend(PREPEND_MYPY)}{vm_line}\n{container_line}\n{vlan_lines}\n"


# "testScriptWithTypes:12:5: error[...] ...", "testScriptWithTypes:12:5: F821 ...",
# "testScriptWithTypes:12: error: ..." (mypy)
LOCATION = re.compile(rf"^{re.escape(COMBINED)}:(\d+)(?::(\d+))?(?=: )")


def map_output(text: str, prelude_lines: int, script_label: str) -> tuple[list[str], int, int]:
    """Rewrite locations in the combined file to the script's own lines. Returns the lines,
    how many messages had a location, and how many of those pointed into the prelude."""
    located = in_prelude = 0
    out = []
    for line in text.splitlines():
        m = LOCATION.match(line)
        if m:
            located += 1
            lineno = int(m.group(1))
            col = f":{m.group(2)}" if m.group(2) else ""
            if lineno > prelude_lines:
                loc = f"{script_label}:{lineno - prelude_lines}{col}"
            else:
                loc = f"<prelude>:{lineno}{col}"
                in_prelude += 1
            line = loc + line[m.end():]
        out.append(line)
    return out, located, in_prelude


def find_tool(name: str) -> list[str] | None:
    """The command that runs `name`: its executable on PATH, else the Python module."""
    exe = shutil.which(name)
    if exe:
        return [exe]
    if importlib.util.find_spec(name) is not None:
        return [sys.executable, "-m", name]
    return None


def tool_version(cmd: list[str]) -> str:
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).strip() or "unknown version"


def quiet_env(tmpdir: Path) -> dict[str, str]:
    """The environment for the checkers: no user config, no colours, no venv leaking in."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("TY_", "RUFF_", "MYPY")) or key in ("VIRTUAL_ENV", "CONDA_PREFIX", "FORCE_COLOR"):
            del env[key]
    env["XDG_CONFIG_HOME"] = str(tmpdir / "config")  # ~/.config/ty/ty.toml, ~/.config/ruff/
    env["NO_COLOR"] = "1"
    return env


@dataclass
class Result:
    tool: str  # "ty", "ruff", "mypy"
    version: str
    returncode: int
    output: list[str]
    located: int
    in_prelude: int

    @property
    def findings(self) -> bool:
        return self.returncode == 1

    @property
    def failed(self) -> bool:
        return self.returncode not in (0, 1)


def run_tool(tool: str, version: str, cmd: list[str], cwd: Path, env: dict[str, str],
             prelude_lines: int, script_label: str) -> Result:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    lines, located, in_prelude = map_output(proc.stdout + proc.stderr, prelude_lines, script_label)
    return Result(tool, version, proc.returncode, lines, located, in_prelude)


def check_ty_ruff(script: str, prelude: str, args: argparse.Namespace, script_label: str,
                  ty_cmd: list[str] | None, ruff_cmd: list[str] | None) -> list[Result]:
    prelude_lines = prelude.count("\n")
    results = []
    with tempfile.TemporaryDirectory(prefix="nixos-testscript-check-") as tmp:
        tmpdir = Path(tmp)
        # driver.nix appends the script with `echo -n`: byte for byte, no newline added.
        (tmpdir / COMBINED).write_text(prelude + script)
        env = quiet_env(tmpdir)
        if ty_cmd is not None:
            # An explicit, empty configuration, and unless --python-env is given, an empty
            # Python environment: only the standard library and the driver (the stubs) resolve,
            # not whatever this machine happens to have in site-packages.
            (tmpdir / "ty.toml").write_text("")
            if args.python_env:
                python_env = args.python_env
            else:
                python_env = tmpdir / "python-env"
                (python_env / "lib" / f"python{args.python_version}" / "site-packages").mkdir(parents=True)
            cmd = [
                *ty_cmd, "check",
                "--project", str(tmpdir),
                "--config-file", str(tmpdir / "ty.toml"),
                "--python", str(python_env),
                "--python-version", args.python_version,
                "--extra-search-path", str(STUBS),
                "--output-format", "concise",
                "--color", "never",
                "--no-progress",
                COMBINED,
            ]
            results.append(run_tool("ty", tool_version(ty_cmd), cmd, tmpdir, env, prelude_lines, script_label))
        if ruff_cmd is not None:
            # --isolated: no ruff.toml/pyproject.toml from anywhere; the rule set is nixpkgs'.
            cmd = [
                *ruff_cmd, "check",
                "--isolated", "--no-cache", "--no-fix",
                "--select", RUFF_SELECT,
                "--output-format", "concise",
                COMBINED,
            ]
            results.append(run_tool("ruff", tool_version(ruff_cmd), cmd, tmpdir, env, prelude_lines, script_label))
    return results


def check_mypy(script: str, prelude: str, args: argparse.Namespace, script_label: str) -> Result:
    prelude_lines = prelude.count("\n")
    with tempfile.TemporaryDirectory(prefix="nixos-testscript-check-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / COMBINED).write_text(prelude + script)
        # An explicit, empty config: nixpkgs' sandbox had no mypy config either.
        (tmpdir / "mypy.ini").write_text("[mypy]\n")
        env = quiet_env(tmpdir)
        env["MYPYPATH"] = str(STUBS)
        base = [sys.executable, "-m", "mypy"]
        cmd = [
            *base,
            *NIXPKGS_MYPY_FLAGS,
            *(["--check-untyped-defs"] if args.check_untyped_defs else []),
            "--config-file", str(tmpdir / "mypy.ini"),
            "--cache-dir", str(tmpdir / ".mypy_cache"),
            COMBINED,
        ]
        return run_tool("mypy", tool_version(base), cmd, tmpdir, env, prelude_lines, script_label)


def report(name: str, result: Result, prelude_lines: int) -> None:
    if result.returncode == 0:
        print(f"check.py: {name}: {result.tool}: OK")
        return
    if result.findings:
        print(f"check.py: {name}: {result.tool}: FAILED ({prelude_lines}-line prelude removed from line numbers)")
    else:
        print(f"check.py: {name}: {result.tool} could not run (exit {result.returncode})")
    for line in result.output:
        print(f"  {line}")
    if result.in_prelude:
        print(f"check.py: {result.in_prelude} {result.tool} message(s) point into the prelude: "
              "a stub/prelude problem, not the script's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check a NixOS testScript as nixpkgs does: ty (types) and ruff (lint)."
    )
    parser.add_argument(
        "script", type=Path, nargs="?", help="the test script (Python), e.g. extracted from testScript"
    )
    parser.add_argument("--nodes", required=True, help="comma-separated node names (the test's `nodes`)")
    parser.add_argument("--containers", default="", help="comma-separated container names (the test's `containers`)")
    parser.add_argument(
        "--vlans",
        default="1",
        help="comma-separated VLAN numbers the nodes use (default: 1, qemu-vm.nix's default); '' for none",
    )
    parser.add_argument("--name", default=None, help="test name, for messages (default: the script's file name)")
    parser.add_argument("--skip-lint", action="store_true", help="do not run ruff (the test's skipLint)")
    parser.add_argument("--skip-typecheck", action="store_true", help="do not run ty (the test's skipTypeCheck)")
    parser.add_argument(
        "--python-version",
        default=DEFAULT_PYTHON_VERSION,
        help=f"Python version ty assumes (default {DEFAULT_PYTHON_VERSION}, nixpkgs' python3 at the pin)",
    )
    parser.add_argument(
        "--python-env",
        type=Path,
        default=None,
        help="a Python environment (prefix or interpreter) whose site-packages ty may resolve imports "
        "from, standing in for the test's extraPythonPackages (default: none, only the stdlib and the driver)",
    )
    parser.add_argument(
        "--mypy", action="store_true", help="also run the mypy check nixpkgs ran before PR #509615 (needs mypy)"
    )
    parser.add_argument(
        "--check-untyped-defs",
        action="store_true",
        help="with --mypy: also check inside functions without annotations (ty always does)",
    )
    parser.add_argument("--print-prelude", action="store_true",
                        help="print the generated prelude (ty/ruff's; mypy's with --mypy) and exit")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 64 if e.code else 0

    nodes = split_list(args.nodes)
    containers = split_list(args.containers)
    try:
        vlans = [int(v) for v in split_list(args.vlans)]
    except ValueError:
        print(f"check.py: --vlans takes numbers, got {args.vlans!r}", file=sys.stderr)
        return 64
    if not nodes and not containers:
        print("check.py: --nodes names no node", file=sys.stderr)
        return 64
    if not re.fullmatch(r"3\.\d+", args.python_version):
        print(f"check.py: --python-version takes 3.N, got {args.python_version!r}", file=sys.stderr)
        return 64

    prelude = ty_prelude(nodes, containers, vlans)
    old_prelude = mypy_prelude(nodes, containers, vlans)
    if args.print_prelude:
        sys.stdout.write(old_prelude if args.mypy else prelude)
        return 0

    if args.script is None:
        print("check.py: no script given", file=sys.stderr)
        return 64
    if not args.script.is_file():
        print(f"check.py: no such script: {args.script}", file=sys.stderr)
        return 64
    script = args.script.read_text()
    name = args.name or args.script.name
    label = str(args.script)

    ty_cmd = None if args.skip_typecheck else find_tool("ty")
    ruff_cmd = None if args.skip_lint else find_tool("ruff")
    if (not args.skip_typecheck and ty_cmd is None) or (not args.skip_lint and ruff_cmd is None):
        print(MISSING_TY_RUFF)
        return 3
    if args.mypy and importlib.util.find_spec("mypy") is None:
        print(MISSING_MYPY)
        return 3

    results = check_ty_ruff(script, prelude, args, label, ty_cmd, ruff_cmd)
    if args.mypy:
        results.append(check_mypy(script, old_prelude, args, label))

    used = ", ".join(f"{r.version}" for r in results) or "none (--skip-lint --skip-typecheck)"
    print(f"check.py: {name}: nodes {', '.join(nodes)}; tools: {used}")
    for r in results:
        report(name, r, (old_prelude if r.tool == "mypy" else prelude).count("\n"))
    skipped = [flag for flag, on in (("--skip-typecheck", args.skip_typecheck), ("--skip-lint", args.skip_lint)) if on]
    if skipped:
        print(f"check.py: {name}: {' '.join(skipped)}: that part NOT checked")

    if any(r.failed for r in results):
        return 2
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
