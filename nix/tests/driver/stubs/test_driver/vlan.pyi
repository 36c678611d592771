# test_driver.vlan (nixpkgs nixos/lib/test-driver/src/test_driver/vlan.py, stored version
# 011792b4f6fb79668fdbbbfc7e57155bb65b7456). A test script sees `vlans` and `vlan<N>`.
import io
import subprocess
from pathlib import Path

from test_driver.logger import AbstractLogger

class VLan:
    nr: int
    socket_dir: Path
    tap_name: str
    process: subprocess.Popen
    pid: int
    fd: io.TextIOBase
    plug_process: subprocess.Popen
    logger: AbstractLogger
    def __init__(self, nr: int, tmp_dir: Path, logger: AbstractLogger) -> None: ...
    def stop(self) -> None: ...
