# Prelude that check.py puts in front of a NixOS testScript for the ty + ruff check, standing in
# for nixpkgs' nixos/lib/test-script-prepend.py as rewritten by nixpkgs PR #509615 (mypy and
# pyflakes replaced by ty and ruff). Since that PR the prelude *defines* every name the driver
# hands to a script (Driver.test_symbols in test_driver/driver.py) instead of only annotating it:
# `ruff check --select F` lints the combined file, and a name that is only annotated
# (`x: T` without a value) counts as unbound there (F821). Likewise each node becomes
# `<name> = create_fake_qemu_machine()` (see check.py), not `<name>: QemuMachine`.
# Nothing in here is ever run; every import below must be used, or ruff reports F401.

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Generator, Optional, Protocol, Union
from unittest import TestCase

from test_driver.debug import DebugAbstract, DebugNop
from test_driver.driver import Driver
from test_driver.logger import AbstractLogger, CompositeLogger
from test_driver.machine import BaseMachine, NspawnMachine, QemuMachine
from test_driver.vlan import VLan


def _only_for_the_checker() -> Any:
    raise RuntimeError("type information for the NixOS test script check only")


# Factories the node/container/vlan lines after this prelude call.
def create_fake_qemu_machine() -> QemuMachine:
    return _only_for_the_checker()


def create_fake_nspawn_machine() -> NspawnMachine:
    return _only_for_the_checker()


def create_fake_vlan() -> VLan:
    return _only_for_the_checker()


class CreateMachineProtocol(Protocol):
    # **kwargs: the driver still accepts the deprecated keep_vm_state=
    def __call__(
        self,
        start_command: Union[str, dict],
        *,
        name: Optional[str] = None,
        keep_machine_state: bool = False,
        **kwargs: Any,
    ) -> QemuMachine: ...


class PollingConditionProtocol(Protocol):
    # bare as a decorator, or called with keyword options first
    def __call__(
        self,
        fun_: Optional[Callable] = None,
        *,
        seconds_interval: float = 2.0,
        description: Optional[str] = None,
    ) -> Union[Callable[[Callable], AbstractContextManager], AbstractContextManager]: ...


def start_all() -> None: ...
def join_all() -> None: ...
def test_script() -> None: ...
def run_tests() -> None: ...
def serial_stdout_on() -> None: ...
def serial_stdout_off() -> None: ...
def dump_machine_ssh() -> None: ...


# retry(fn, timeout_seconds=900): calls fn(last_try: bool) once a second until it is truthy
def retry(fn: Callable, timeout_seconds: int = 900) -> None: ...


@contextmanager
def subtest(name: str) -> Generator[None, None, None]:
    yield


create_machine: CreateMachineProtocol = _only_for_the_checker()
polling_condition: PollingConditionProtocol = _only_for_the_checker()

machines: list[BaseMachine] = []
machines_qemu: list[QemuMachine] = []
machines_nspawn: list[NspawnMachine] = []
vlans: list[VLan] = []
driver: Driver = _only_for_the_checker()
log: AbstractLogger = CompositeLogger([])
debug: DebugAbstract = DebugNop()
t: TestCase = TestCase()
