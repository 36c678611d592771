# Prelude that check.py puts in front of a NixOS testScript before running mypy, standing in
# for nixpkgs' nixos/lib/test-script-prepend.py (mypy era, before nixpkgs PR #509615 moved the
# check to ty). It declares, with their types, the names the test driver hands to a test script
# (Driver.test_symbols in test_driver/driver.py); the node names follow it, one
# `<name>: QemuMachine;` each, as nixos/lib/testing/driver.nix writes them.
# Everything here is only a declaration: nothing is ever run.

from typing import Any, Callable, ContextManager, List, Optional, Union
from unittest import TestCase

from typing_extensions import Protocol

from test_driver.debug import DebugAbstract
from test_driver.driver import Driver
from test_driver.logger import AbstractLogger
from test_driver.machine import BaseMachine, NspawnMachine, QemuMachine
from test_driver.vlan import VLan


class RetryProtocol(Protocol):
    # retry(fn, timeout_seconds=900): call fn(last_try: bool) each second until it is truthy
    def __call__(self, fn: Callable, timeout_seconds: int = 900) -> None: ...


class PollingConditionProtocol(Protocol):
    # usable bare as a decorator, or called with keyword options first
    def __call__(
        self,
        fun_: Optional[Callable] = None,
        *,
        seconds_interval: float = 2.0,
        description: Optional[str] = None,
    ) -> Union[Callable[[Callable], ContextManager], ContextManager]: ...


class CreateMachineProtocol(Protocol):
    # **kwargs: nixpkgs keeps accepting the deprecated keep_vm_state=
    def __call__(
        self,
        start_command: str | dict,
        *,
        name: Optional[str] = None,
        keep_machine_state: bool = False,
        **kwargs: Any,
    ) -> QemuMachine: ...


start_all: Callable[[], None]
join_all: Callable[[], None]
test_script: Callable[[], None]
run_tests: Callable[[], None]
subtest: Callable[[str], ContextManager[None]]
retry: RetryProtocol
polling_condition: PollingConditionProtocol
create_machine: CreateMachineProtocol
serial_stdout_on: Callable[[], None]
serial_stdout_off: Callable[[], None]
dump_machine_ssh: Callable[[], None]
machines: List[BaseMachine]
machines_qemu: List[QemuMachine]
machines_nspawn: List[NspawnMachine]
vlans: List[VLan]
driver: Driver
log: AbstractLogger
debug: DebugAbstract
t: TestCase
