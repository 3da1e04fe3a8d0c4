//! Kill points for crash tests (RELIABILITY C3/C8, `docs/maintenance.md` G7).
//!
//! `COFFER_KILL_AT=<name>` makes the process SIGKILL itself the first time it passes the point
//! `<name>`; `COFFER_KILL_AT=<name>@<n>` at its n-th passage. The variable is read once; when it
//! is unset a point costs one load and one branch. A SIGKILL, unlike a panic or an abort, runs
//! no destructor and flushes nothing: what is durable at that instant is all a restart finds.
//!
//! Owns: nothing but the switch. Must never change behaviour when the variable is unset.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The variable naming the point.
pub const VAR: &str = "COFFER_KILL_AT";

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn target() -> Option<&'static (String, u64)> {
    TARGET
        .get_or_init(|| {
            let v = std::env::var(VAR).ok()?;
            Some(match v.split_once('@') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1).max(1)),
                None => (v, 1),
            })
        })
        .as_ref()
}

/// A kill point: the process dies here when [`VAR`] names it.
pub fn point(name: &str) {
    let Some((want, nth)) = target() else {
        return;
    };
    if want == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        tracing::warn!(point = name, "{VAR}: killing the process here");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL to oneself is delivered before kill() returns; never continue past the point.
        std::process::abort();
    }
}
