//! Keys and encryption.
//!
//! Owns: the repository's master key and its wrapped key file ([`keys`]), per-pack keys, and the
//! [`Encryption`] seam through which the pack writer and reader seal and open records. Must never
//! touch files other than the key file, nor the network.

pub mod keys;
