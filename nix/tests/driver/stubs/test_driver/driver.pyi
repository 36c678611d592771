# test_driver.driver (nixpkgs nixos/lib/test-driver/src/test_driver/driver.py, stored version
# 003d58163f469fbeb0d51e4ef8d46af622759627, the same nspawn-era API as machine/__init__.py
# @ 019697db). A test script sees the Driver as `driver`; the globals the driver hands to the
# script (Driver.test_symbols) are declared in ../../prepend.py.
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from unittest import TestCase

from test_driver.debug import DebugAbstract
from test_driver.logger import AbstractLogger
from test_driver.machine import BaseMachine, NspawnMachine, QemuMachine
from test_driver.polling_condition import PollingCondition
from test_driver.vlan import VLan

class AssertionTester(TestCase): ...

def get_tmp_dir() -> Path: ...
def pythonize_name(name: str) -> str: ...

class Driver:
    tests: str
    out_dir: Path
    vlans: list[VLan]
    machines_qemu: list[QemuMachine]
    machines_nspawn: list[NspawnMachine]
    polling_conditions: list[PollingCondition]
    global_timeout: int
    race_timer: threading.Timer
    logger: AbstractLogger
    debug: DebugAbstract

    def __init__(
        self,
        vm_names: list[str] | None,
        vm_start_scripts: list[str],
        container_names: list[str] | None,
        container_start_scripts: list[str],
        vlans: list[int],
        tests: str,
        out_dir: Path,
        logger: AbstractLogger,
        keep_machine_state: bool = False,
        global_timeout: int = 604800,
        debug: DebugAbstract = ...,
    ) -> None: ...
    @property
    def machines(self) -> list[QemuMachine | NspawnMachine]: ...
    def __enter__(self) -> Driver: ...
    def __exit__(self, *_: Any) -> None: ...
    def subtest(self, name: str) -> Iterator[None]: ...
    def test_symbols(self) -> dict[str, Any]: ...
    def dump_machine_ssh(self, offset: int) -> None: ...
    def test_script(self) -> None: ...
    def run_tests(self) -> None: ...
    def start_all(self) -> None: ...
    def join_all(self) -> None: ...
    def terminate_test(self) -> None: ...
    def create_machine(
        self,
        start_command: str,
        *,
        name: str | None = None,
        keep_machine_state: bool = False,
    ) -> QemuMachine: ...  # BaseMachine @ 003d5816; QemuMachine since nixpkgs PR #504626 (2026-03)
    def serial_stdout_on(self) -> None: ...
    def serial_stdout_off(self) -> None: ...
    def check_polling_conditions(self) -> None: ...
    def polling_condition(
        self,
        fun_: Callable | None = None,
        *,
        seconds_interval: float = 2.0,
        description: str | None = None,
    ) -> Callable[[Callable], AbstractContextManager] | AbstractContextManager: ...
