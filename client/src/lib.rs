//! `coffer-client`: the client every fleet machine runs.
//!
//! Owns the connection to an appliance (TLS pinned by SHA-256 fingerprint, session token:
//! `net/`), the backup stages `walk -> read -> chunk -> hash -> need -> upload` (`stages/`, in
//! the order `pipeline.rs` spells), snapshots (`snapshot/`: tree objects, the parent, diff, the
//! commit), and restore (`restore/`). The `coffer` binary (`main.rs`, `cli/`) is built on the
//! surface below and nothing else.
//!
//! Must never depend on `coffer-appliance`, RocksDB or glommio: the client stays small. Every
//! module is private; what other crates, the binary, tests and benches use is re-exported here,
//! and every fallible function returns [`ClientError`] (see `error.rs` for the policy).

mod config;
mod error;
#[cfg(test)]
mod fuzz_targets;
mod keyring;
mod mount;
mod net;
mod pipeline;
mod policy;
mod restore;
mod snapshot;
mod stages;

pub use config::{default_path, save_private, ClientConfig};
pub use error::{ClientError, TreeError};
pub use keyring::enroll::{create as create_enrollment, redeem as redeem_enrollment, Enrolled};
pub use keyring::{Kdf, Master, Member, Role};
pub use mount::{check_fuse, mount, umount, CofferFs, MountOptions};
pub use net::{
    channel, Codec, Deadlines, Frame, Need, PutStats, Session, SessionOptions, Target,
    WithDeadlines,
};
pub use pipeline::{backup, BackupOptions, BackupSummary};
pub use policy::{systemd_timer, BackupPolicy, Filter, PolicyField};
pub use restore::{restore, restore_with, Overwrite, RestoreSummary};
pub use snapshot::{diff, fetch_tree, Change, TreeCache};
pub use stages::chunk::Cdc;
pub use stages::Progress;
