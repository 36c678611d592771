//! A runner for the VM benchmark: writes the wall-clock time of its own start, in
//! nanoseconds, to `./started`, then sleeps until killed. A compiled program, so the time
//! it stamps is within a fraction of a millisecond of the supervisor's exec (a shell
//! running `date` adds a fork and two execs).
#![allow(clippy::unwrap_used)]

fn main() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::fs::write("started.tmp", format!("{now}\n")).unwrap();
    std::fs::rename("started.tmp", "started").unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
