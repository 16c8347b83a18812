//! `ROVL_BENCH_URING=1`: FUSE-over-io_uring (the fuse module's
//! `enable_uring`, kernel 6.14+) on for a bench run, and back as it was.

use std::fs;

const URING: &str = "/sys/module/fuse/parameters/enable_uring";

pub struct Uring(Option<String>);

impl Uring {
    pub fn setup() -> Uring {
        let was = fs::read_to_string(URING).ok().map(|s| s.trim().to_string());
        if std::env::var("ROVL_BENCH_URING").as_deref() == Ok("1") && was.as_deref() == Some("N") {
            if fs::write(URING, "Y").is_ok() {
                return Uring(Some("N".into()));
            }
            eprintln!("bench: cannot turn on {URING}");
        }
        Uring(None)
    }

    /// Whether the kernel offers FUSE-over-io_uring now.
    pub fn on(&self) -> bool {
        fs::read_to_string(URING).is_ok_and(|s| s.trim() == "Y")
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if let Some(was) = &self.0 {
            let _ = fs::write(URING, was);
        }
    }
}
