# Typed interface of test_driver.machine.qmp (nixpkgs nixos/lib/test-driver/src/test_driver/
# machine/qmp.py, stored version 1fd39e0c4e0b0a90339715b7e41d7681bb23a99b). Reachable from a
# test script as `machine.qmp_client`.
import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path
from queue import Queue
from typing import Any

class QMPAPIError(RuntimeError):
    class_name: Any
    description: Any
    transaction_id: Any
    def __init__(self, message: dict[str, Any]) -> None: ...

class QMPSession:
    sock: socket.socket
    results: Queue[dict[str, str]]
    pending_events: Queue[dict[str, Any]]
    def __init__(self, sock: socket.socket) -> None: ...
    @classmethod
    def from_path(cls, path: Path) -> QMPSession: ...
    def close(self) -> None: ...
    def read_pending_messages(self) -> None: ...
    def wait_for_event(self, timeout: dt.timedelta = ...) -> dict[str, Any]: ...
    def events(self, timeout: dt.timedelta = ...) -> Iterator[dict[str, Any]]: ...
    def send(self, cmd: str, args: dict[str, str] = ...) -> dict[str, str]: ...
