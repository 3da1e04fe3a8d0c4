//! Who may do what: accounts and passwords ([`auth`]), sessions and what each session may read,
//! the access rules ([`rules`]) and the administrative operations on them ([`admin`]).
//!
//! Owns: password hashing and login throttling, session tokens, the opened-snapshot and uploaded
//! sets of each session and what they pin against the GC, rule evaluation and the built-in
//! defaults, quotas ([`quota`]). Must never touch pack files or shard indexes: it learns
//! what a snapshot reaches from [`crate::reach`] and stores accounts through [`crate::catalog`].

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod quota;
pub mod rules;
pub mod sessions;
mod throttle;

pub use accounts::normalise_identity;
pub use auth::{Auth, ControlUser};
pub use sessions::{Role, Session, Use};
pub use throttle::RateWindow;
