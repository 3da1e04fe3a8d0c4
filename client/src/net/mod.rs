//! The network island: everything that speaks gRPC to an appliance.
//!
//! Owns the pinned-TLS channel ([`connect`]), the logged-in [`Session`] with one method per RPC
//! ([`session`]) and the wire form of a chunk ([`frame`]). It runs on tokio and never blocks.
//!
//! Must never touch: the local file system (walking, reading, restoring), the order of the backup
//! stages, or what a snapshot's trees mean. It moves bytes and checks what comes back (chunk ids
//! against their bytes, batch counts, acknowledgements); the stages decide what to send.

mod connect;
mod deadline;
mod frame;
pub(crate) mod session;

pub use connect::{channel, Target};
pub use deadline::{Deadlines, WithDeadlines};
pub use frame::{Codec, Frame};
pub use session::{Need, PutStats, Session, SessionOptions};
